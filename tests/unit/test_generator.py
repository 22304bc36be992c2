"""The deterministic orders data set: determinism, schema, nulls, streaming."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from ferry.backends.checksum import Checksum
from ferry.backends.generator import (
    BLOCK_ROWS,
    ORDERS_SCHEMA,
    generate_batches,
    generate_table,
    orders_block,
)


def _table(start, stop, **kwargs):
    return pa.Table.from_batches(list(generate_batches(start, stop, **kwargs)), ORDERS_SCHEMA)


@pytest.fixture(scope="module")
def sample():
    """Three blocks' worth of rows (plus a bit), used by several tests."""
    return generate_table(0, 2 * BLOCK_ROWS + 1000)


def test_schema(sample):
    assert sample.schema == ORDERS_SCHEMA
    assert ORDERS_SCHEMA.names == [
        "order_id", "customer_id", "status", "country", "customer_name", "amount",
        "discount", "quantity", "created_at", "is_gift", "tags", "shipping", "note",
    ]  # fmt: skip
    assert ORDERS_SCHEMA.field("amount").type == pa.decimal128(12, 2)
    assert ORDERS_SCHEMA.field("created_at").type == pa.timestamp("us", tz="UTC")
    assert ORDERS_SCHEMA.field("tags").type == pa.list_(pa.string())
    assert ORDERS_SCHEMA.field("shipping").type == pa.struct(
        [("city", pa.string()), ("postcode", pa.string()), ("express", pa.bool_())]
    )
    assert not ORDERS_SCHEMA.field("order_id").nullable
    for batch in sample.to_batches():
        batch.validate(full=True)


def test_order_id_is_row_number_plus_one():
    table = _table(123_456, 123_556)
    assert table.column("order_id").to_pylist() == list(range(123_457, 123_557))
    assert table.column("order_id").null_count == 0


@pytest.mark.parametrize(
    "splits",
    [
        [(0, 50_001, 9_999), (50_001, BLOCK_ROWS + 5, 100_000), (BLOCK_ROWS + 5, 200_000, 65_536)],
        [(0, 1, 1), (1, 199_999, 131_072), (199_999, 200_000, 7)],
        [(0, 100_000, 33_333), (100_000, 200_000, 100_000)],
    ],
)
def test_any_partitioning_gives_the_same_rows(splits):
    whole = _table(0, 200_000)
    parts = [_table(a, b, batch_rows=rows) for a, b, rows in splits]
    joined = pa.concat_tables(parts)
    assert joined.equals(whole)
    combined = Checksum()
    for part in parts:
        combined = combined.combine(Checksum().update(part))
    assert combined == Checksum().update(whole)


def test_rows_far_into_the_data_set_match_their_block():
    start = 10_000_000 - 50
    table = _table(start, start + 100, batch_rows=30)
    block_a = orders_block(start // BLOCK_ROWS).slice(start % BLOCK_ROWS)
    block_b = orders_block(start // BLOCK_ROWS + 1)
    expected = pa.Table.from_batches([block_a, block_b]).slice(0, 100)
    assert table.equals(expected)


def test_seed_changes_values_but_not_ids():
    a = _table(0, 1000, seed=1)
    b = _table(0, 1000, seed=2)
    assert a.column("order_id").equals(b.column("order_id"))
    assert not a.column("customer_id").equals(b.column("customer_id"))
    assert _table(0, 1000, seed=1).equals(a)


@pytest.mark.parametrize("batch_rows", [1, 1000, BLOCK_ROWS - 1, BLOCK_ROWS, 100_000])
def test_batches_are_bounded_and_complete(batch_rows):
    start, stop = 500, 500 + 2 * BLOCK_ROWS + 77 if batch_rows > 1 else 600
    sizes = [b.num_rows for b in generate_batches(start, stop, batch_rows=batch_rows)]
    assert sum(sizes) == stop - start
    assert max(sizes) <= batch_rows
    assert all(s > 0 for s in sizes)


def test_streaming_is_lazy():
    # A huge range must not be materialized: taking one batch is instant.
    batches = generate_batches(0, 10**12, batch_rows=10)
    first = next(batches)
    assert first.num_rows == 10


def test_empty_range():
    assert list(generate_batches(5, 5)) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"start": -1, "stop": 5},
        {"start": 5, "stop": 4},
        {"start": 0, "stop": 5, "batch_rows": 0},
        {"start": 0, "stop": 5, "seed": -3},
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        list(generate_batches(**kwargs))


def test_nulls_really_occur(sample):
    n = sample.num_rows
    nulls = {name: sample.column(name).null_count for name in sample.column_names}
    for never_null in ("order_id", "customer_id", "status", "quantity", "created_at"):
        assert nulls[never_null] == 0, never_null
    for name in ("country", "customer_name", "amount", "is_gift", "tags", "shipping"):
        assert 0 < nulls[name] < 0.1 * n, name
    assert 0.07 * n < nulls["discount"] < 0.13 * n  # about 10%
    assert nulls["note"] > 0.85 * n  # mostly null ...
    assert pc.count(pc.utf8_length(sample.column("note")), mode="only_valid").as_py() > 0  # ... not all
    postcode = pc.struct_field(sample.column("shipping"), "postcode")
    assert postcode.null_count > nulls["shipping"]  # child nulls besides null structs


def test_lists_have_nulls_empties_and_values(sample):
    tags = sample.column("tags")
    lengths = pc.list_value_length(tags)
    assert tags.null_count > 0
    assert pc.sum(pc.equal(lengths, 0)).as_py() > 0  # empty, not null
    assert pc.max(lengths).as_py() == 4
    assert set(pc.unique(pc.list_flatten(tags)).to_pylist()) >= {"gift", "promo", "vip"}


def test_notes_include_empty_string(sample):
    notes = sample.column("note").drop_null()
    assert "" in set(notes.to_pylist())


def test_non_ascii_names(sample):
    names = set(pc.unique(sample.column("customer_name")).drop_null().to_pylist())
    for fragment in ("Zoë", "Łukasz", "José", "王芳"):
        assert any(fragment in name for name in names), fragment
    cities = set(pc.unique(pc.struct_field(sample.column("shipping"), "city")).to_pylist())
    assert {"Kraków", "東京"} <= cities


def test_value_ranges(sample):
    statuses = set(sample.column("status").unique().to_pylist())
    assert statuses == {"new", "paid", "shipped", "delivered", "cancelled", "returned"}
    countries = sample.column("country").drop_null().unique().to_pylist()
    assert all(len(c) == 2 and c.isupper() for c in countries)
    assert pc.min(sample.column("quantity")).as_py() >= 1
    created = sample.column("created_at")
    assert pc.min(created).as_py() >= dt.datetime(2023, 1, 1, tzinfo=dt.timezone.utc)
    assert pc.max(created).as_py() < dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    discount = sample.column("discount").drop_null()
    assert 0.0 <= pc.min(discount).as_py() and pc.max(discount).as_py() <= 0.3


def test_amounts_are_exact_decimals_and_returns_are_refunds(sample):
    rows = sample.slice(0, 5000).select(["status", "amount"]).to_pylist()
    amounts = [r["amount"] for r in rows if r["amount"] is not None]
    assert all(isinstance(a, Decimal) and a.as_tuple().exponent == -2 for a in amounts)
    returned = [r["amount"] for r in rows if r["status"] == "returned" and r["amount"] is not None]
    others = [r["amount"] for r in rows if r["status"] != "returned" and r["amount"] is not None]
    assert returned and all(a < 0 for a in returned)
    assert all(a > 0 for a in others)
    # The decimal buffer is built by hand (sign-extended high word): Arrow's own
    # kernels must read the same values as Python does.
    assert all(abs(a) < 10**7 for a in amounts)
    as_text = pc.cast(sample.column("amount").slice(0, 5000), pa.string()).to_pylist()
    assert as_text == [None if r["amount"] is None else str(r["amount"]) for r in rows]

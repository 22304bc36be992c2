"""The deterministic "orders" data set used by the demo, the tests and the benchmarks.

The data set is infinite: row ``i`` (0-based) exists for every ``i >= 0`` and its
values depend only on ``(seed, i)``.  Any split of a row range into partitions
and batches therefore yields exactly the same rows, which is what lets a
parallel flow, a test and a benchmark all agree on the same data.

How determinism is achieved: rows are produced in fixed blocks of
:data:`BLOCK_ROWS` rows.  Block ``b`` draws every column from its own
``numpy.random.Generator(PCG64)`` seeded with ``SeedSequence(seed,
spawn_key=(b, column_id))``.  A requested range is served by generating the
blocks it touches and slicing them; nothing larger than one block is kept.
Per-column streams mean that adding a column later does not change the values
of the existing ones.

Everything is vectorized (numpy draws, ``pa.Array.take`` on small
vocabularies, buffers assembled directly), so one core produces several
million rows per second.

Note: the values are stable for a given numpy version.  NumPy does not promise
that ``Generator`` distribution methods stay bit-identical across releases, so
compare checksums only between runs that use the same numpy.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

__all__ = [
    "BLOCK_ROWS",
    "ORDERS_SCHEMA",
    "generate_batches",
    "generate_table",
    "orders_block",
]

#: Rows per internal block.  Part of the data set's definition: changing it
#: changes the generated values, so it is a constant, not a parameter.
BLOCK_ROWS = 65_536

SHIPPING_TYPE = pa.struct(
    [
        pa.field("city", pa.string()),
        pa.field("postcode", pa.string()),
        pa.field("express", pa.bool_()),
    ]
)

#: Schema of the orders data set.  Only ``order_id`` is declared NOT NULL.
ORDERS_SCHEMA = pa.schema(
    [
        pa.field("order_id", pa.int64(), nullable=False),
        pa.field("customer_id", pa.int64()),
        pa.field("status", pa.string()),
        pa.field("country", pa.string()),
        pa.field("customer_name", pa.string()),
        pa.field("amount", pa.decimal128(12, 2)),
        pa.field("discount", pa.float64()),
        pa.field("quantity", pa.int32()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
        pa.field("is_gift", pa.bool_()),
        pa.field("tags", pa.list_(pa.string())),
        pa.field("shipping", SHIPPING_TYPE),
        pa.field("note", pa.string()),
    ]
)

# --- vocabularies (small; built once at import) -------------------------------

_STATUSES = ["new", "paid", "shipped", "delivered", "cancelled", "returned"]
_STATUS_P = [0.10, 0.15, 0.20, 0.45, 0.06, 0.04]
_RETURNED = _STATUSES.index("returned")

_COUNTRIES = [
    "US", "DE", "FR", "GB", "PL", "ES", "IT", "NL", "SE", "CN",
    "JP", "BR", "MX", "IN", "CA", "AU", "CH", "AT", "BE", "DK",
]  # fmt: skip
# Zipf-like weights: a few countries dominate, as in real shops.
_COUNTRY_P = 1.0 / np.arange(1, len(_COUNTRIES) + 1)

_FIRST_NAMES = [
    "Anna", "Ben", "Chloé", "David", "Emma", "Fatima", "Giulia", "Hiro", "Inès",
    "Jan", "Kai", "Léa", "Mateo", "Noah", "Olivia", "Pedro", "Rosa", "Sven",
    "Tomás", "Uma", "Victor", "Wei", "Yuki", "Zoë", "Łukasz", "José", "Søren",
    "Ayşe", "Björn", "Ольга", "Νίκος", "Maëlle",
]  # fmt: skip
_LAST_NAMES = [
    "Smith", "Müller", "Nowak", "García", "Rossi", "Dubois", "Jensen",
    "Kowalski", "Silva", "Tanaka", "Öztürk", "Novák", "Hernández", "Johansson",
    "Ivanov", "Brown", "van Dijk", "O'Brien", "Schäfer", "Łęcka",
]  # fmt: skip
# Names written without a space in their own script.
_WHOLE_NAMES = ["王芳", "李伟", "张敏", "佐藤花子", "김민준", "Nguyễn Văn An"]
_NAMES = pa.array(
    [f"{first} {last}" for first in _FIRST_NAMES for last in _LAST_NAMES] + _WHOLE_NAMES,
    pa.string(),
)

_CITIES = pa.array(
    [
        "New York", "Berlin", "Paris", "London", "Kraków", "Madrid", "Roma",
        "Amsterdam", "Malmö", "北京", "東京", "São Paulo", "Ciudad de México",
        "Mumbai", "Toronto", "Sydney", "Zürich", "Wien", "Bruxelles",
        "København", "Łódź", "München", "Göteborg", "Reykjavík",
    ],
    pa.string(),
)  # fmt: skip

_TAGS = pa.array(
    [
        "gift", "promo", "bulk", "fragile", "priority", "eco", "vip", "repeat",
        "b2b", "clearance", "preorder", "backorder",
    ],
    pa.string(),
)  # fmt: skip
_TAG_COUNT_P = [0.30, 0.30, 0.20, 0.12, 0.08]  # P(0 tags) .. P(4 tags)

# The empty string is deliberate: a non-null empty note is an edge case that
# readers, writers and checksums must keep apart from null.
_NOTES = pa.array(
    [
        "Leave at the door", "Call before delivery", "Bitte beim Nachbarn abgeben",
        "Fragile — handle with care", "Gift wrap please 🎁", "請放在門口",
        "Deliver after 6 pm", "No invoice in the box", "Livraison express s.v.p.",
        "",
    ],
    pa.string(),
)  # fmt: skip

_STATUS_ARR = pa.array(_STATUSES, pa.string())
_COUNTRY_ARR = pa.array(_COUNTRIES, pa.string())

_U16 = 1 << 16

# 2023-01-01T00:00:00Z .. 2026-01-01T00:00:00Z in microseconds.
_TS_LO = 1_672_531_200_000_000
_TS_HI = 1_767_225_600_000_000

# Column ids for the per-column random streams.  Never renumber: the ids are
# part of the data set's definition.
_C_CUSTOMER, _C_STATUS, _C_COUNTRY, _C_NAME, _C_AMOUNT, _C_DISCOUNT = 1, 2, 3, 4, 5, 6
_C_QUANTITY, _C_CREATED, _C_GIFT, _C_TAGS, _C_SHIPPING, _C_NOTE = 7, 8, 9, 10, 11, 12


def _rng(seed: int, block_index: int, column_id: int) -> np.random.Generator:
    """Independent stream for one column of one block."""
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(block_index, column_id)))
    )


def _lut(p) -> np.ndarray:
    """Index lookup table for a discrete distribution, 2**16 entries.

    Drawing one uint16 per row and indexing this table is several times faster
    than ``searchsorted`` on a CDF or ``rng.choice(p=...)``; the 1/65536
    resolution is plenty for synthetic data.
    """
    cdf = np.cumsum(np.asarray(p, dtype=np.float64))
    cdf /= cdf[-1]
    u = (np.arange(_U16) + 0.5) / _U16
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1).astype(np.int32)


def _draw(rng: np.random.Generator, lut: np.ndarray, n: int) -> np.ndarray:
    """n indices distributed as described by ``lut`` (see :func:`_lut`)."""
    return lut[rng.integers(0, _U16, n, dtype=np.uint16)]


def _mask(rng: np.random.Generator, p: float, n: int) -> np.ndarray:
    """Boolean array, True with probability ``p`` (to 1/65536)."""
    return rng.integers(0, _U16, n, dtype=np.uint16) < round(p * _U16)


def _take(vocab: pa.Array, idx: np.ndarray, null_mask: np.ndarray | None = None) -> pa.Array:
    """Strings by index into a small vocabulary; masked indices become nulls."""
    return vocab.take(pa.array(idx, pa.int32(), mask=null_mask))


def _bitmap(valid: np.ndarray) -> pa.Buffer:
    """Arrow validity bitmap (LSB first) from a boolean array."""
    return pa.py_buffer(np.packbits(valid, bitorder="little"))


def _decimal_from_cents(cents: np.ndarray, null_mask: np.ndarray, type_: pa.DataType) -> pa.Array:
    """decimal128 array straight from int64 unscaled values (two's complement, LE).

    The 16-byte value is the int64 in the low word and its sign extension in the
    high word; building it in numpy avoids a slow per-value cast.
    """
    words = np.empty((len(cents), 2), dtype=np.int64)
    words[:, 0] = cents
    words[:, 1] = cents >> 63
    null_count = int(null_mask.sum())
    validity = _bitmap(~null_mask) if null_count else None
    return pa.Array.from_buffers(
        type_, len(cents), [validity, pa.py_buffer(words)], null_count=null_count
    )


# Distribution tables, built once (a few hundred KiB in total).
_STATUS_LUT = _lut(_STATUS_P)
_COUNTRY_LUT = _lut(_COUNTRY_P)
_TAG_COUNT_LUT = _lut(_TAG_COUNT_P)
# Quantity 1..20, geometric-like: most orders hold one or two items.
_QUANTITY_LUT = _lut(0.45 * 0.55 ** np.arange(20))
# Unit prices: a fixed table of 65,536 log-normal prices (median about 40.00) so
# that one uint16 draw picks a price instead of a normal draw plus exp per row.
# Clipped so that price x quantity always fits decimal(12, 2).
_UNIT_PRICE_CENTS = np.clip(
    np.rint(np.exp(np.random.Generator(np.random.PCG64(1)).normal(3.7, 1.0, _U16)) * 100.0),
    1,
    100_000_000,
).astype(np.int64)


def orders_block(block_index: int, seed: int = 42) -> pa.RecordBatch:
    """Generate block ``block_index`` (rows ``[b*BLOCK_ROWS, (b+1)*BLOCK_ROWS)``) in full."""
    if block_index < 0:
        raise ValueError(f"block_index must be >= 0, got {block_index}")
    n = BLOCK_ROWS
    first = block_index * BLOCK_ROWS

    order_id = pa.array(np.arange(first + 1, first + n + 1, dtype=np.int64))

    rng = _rng(seed, block_index, _C_CUSTOMER)
    customer_id = pa.array(rng.integers(1, 200_001, n, dtype=np.int64))

    rng = _rng(seed, block_index, _C_STATUS)
    status_idx = _draw(rng, _STATUS_LUT, n)
    status = _take(_STATUS_ARR, status_idx)

    rng = _rng(seed, block_index, _C_COUNTRY)
    country = _take(_COUNTRY_ARR, _draw(rng, _COUNTRY_LUT, n), _mask(rng, 0.01, n))

    rng = _rng(seed, block_index, _C_NAME)
    name = _take(_NAMES, rng.integers(0, len(_NAMES), n, dtype=np.int32), _mask(rng, 0.02, n))

    rng = _rng(seed, block_index, _C_QUANTITY)
    quantity_np = _draw(rng, _QUANTITY_LUT, n) + 1
    quantity = pa.array(quantity_np)

    rng = _rng(seed, block_index, _C_AMOUNT)
    # amount = unit price x quantity; returns are refunds (negative amounts).
    cents = _UNIT_PRICE_CENTS[rng.integers(0, _U16, n, dtype=np.uint16)] * quantity_np
    cents[status_idx == _RETURNED] *= -1
    amount = _decimal_from_cents(cents, _mask(rng, 0.005, n), ORDERS_SCHEMA.field("amount").type)

    rng = _rng(seed, block_index, _C_DISCOUNT)
    discount = pa.array(rng.integers(0, 31, n) / 100.0, pa.float64(), mask=_mask(rng, 0.10, n))

    rng = _rng(seed, block_index, _C_CREATED)
    created_at = pa.array(
        rng.integers(_TS_LO, _TS_HI, n, dtype=np.int64), ORDERS_SCHEMA.field("created_at").type
    )

    rng = _rng(seed, block_index, _C_GIFT)
    is_gift = pa.array(_mask(rng, 0.08, n), pa.bool_(), mask=_mask(rng, 0.05, n))

    tags = _tags(_rng(seed, block_index, _C_TAGS), n)
    shipping = _shipping(_rng(seed, block_index, _C_SHIPPING), n)

    rng = _rng(seed, block_index, _C_NOTE)
    note = _take(_NOTES, rng.integers(0, len(_NOTES), n, dtype=np.int32), _mask(rng, 0.92, n))

    return pa.RecordBatch.from_arrays(
        [
            order_id, customer_id, status, country, name, amount, discount,
            quantity, created_at, is_gift, tags, shipping, note,
        ],
        schema=ORDERS_SCHEMA,
    )  # fmt: skip


def _tags(rng: np.random.Generator, n: int) -> pa.Array:
    """list<string>: 0-4 tags per row, about 5% null lists (distinct from empty ones)."""
    null_mask = _mask(rng, 0.05, n)
    lengths = _draw(rng, _TAG_COUNT_LUT, n)
    lengths[null_mask] = 0  # a null list occupies no child values
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = _take(_TAGS, rng.integers(0, len(_TAGS), int(offsets[-1]), dtype=np.int32))
    return pa.ListArray.from_arrays(
        pa.array(offsets), values, type=ORDERS_SCHEMA.field("tags").type, mask=pa.array(null_mask)
    )


def _shipping(rng: np.random.Generator, n: int) -> pa.Array:
    """struct<city, postcode, express>, about 3% null structs and 2% null postcodes."""
    city = _take(_CITIES, rng.integers(0, len(_CITIES), n, dtype=np.int32))
    # Arrow's int->string cast is vectorized; five digits like many postcodes.
    postcode = pa.array(
        rng.integers(10_000, 100_000, n, dtype=np.int32), mask=_mask(rng, 0.02, n)
    ).cast(pa.string())
    express = pa.array(_mask(rng, 0.2, n))
    return pa.StructArray.from_arrays(
        [city, postcode, express], fields=list(SHIPPING_TYPE), mask=pa.array(_mask(rng, 0.03, n))
    )


def generate_batches(
    start: int, stop: int, *, seed: int = 42, batch_rows: int = 65_536
) -> Iterator[pa.RecordBatch]:
    """Stream rows ``[start, stop)`` of the orders data set as record batches.

    Row ``i`` has ``order_id == i + 1`` and values that depend only on
    ``(seed, i)``, so any partitioning gives the same rows.  Each batch has at
    most ``batch_rows`` rows; only the current internal block is held in memory.
    """
    if start < 0 or stop < start:
        raise ValueError(f"need 0 <= start <= stop, got start={start}, stop={stop}")
    if batch_rows <= 0:
        raise ValueError(f"batch_rows must be positive, got {batch_rows}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")

    block_index, block = -1, None
    pos = start
    while pos < stop:
        end = min(pos + batch_rows, stop)
        pieces = []
        while pos < end:
            wanted = pos // BLOCK_ROWS
            if wanted != block_index:
                # Dropping the previous block here keeps memory at one block.
                block_index, block = wanted, orders_block(wanted, seed)
            lo = pos - block_index * BLOCK_ROWS
            hi = min(end - block_index * BLOCK_ROWS, BLOCK_ROWS)
            pieces.append(block.slice(lo, hi - lo))
            pos = block_index * BLOCK_ROWS + hi
        # Batches larger than a block span several blocks and need one copy.
        yield pieces[0] if len(pieces) == 1 else pa.concat_batches(pieces)


def generate_table(start: int, stop: int, *, seed: int = 42) -> pa.Table:
    """Rows ``[start, stop)`` as a table (convenience for tests and small demos)."""
    return pa.Table.from_batches(list(generate_batches(start, stop, seed=seed)), ORDERS_SCHEMA)

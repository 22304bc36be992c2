"""Order-independent checksums of Arrow data, for verifying that a copy is complete.

Definition (stable; changing it invalidates stored checksums):

* Every value of every column is hashed to 64 bits from its *value*, not its
  memory layout: slices, chunking, dictionary encoding, ``large_*``/view
  variants and Parquet round trips do not change it.  Null values hash to the
  fixed constant :data:`NULL_HASH`.
* A row's hash combines its column hashes with a per-position key (so moving a
  value to another column changes it) and is finished with a splitmix64 mix.
* The checksum is the **sum** of row hashes mod 2**64.  A sum (not XOR) means a
  duplicated row changes the result, while row order and batch boundaries do
  not; partial checksums of partitions simply add up (:meth:`Checksum.combine`).

Column names and types are not part of the row hashes; they go into a separate
:attr:`Checksum.schema_fingerprint` so that a mismatch can be reported as "the
schemas differ" rather than as an unexplained checksum difference.

Per-type rules: integers are sign/zero-extended to 64 bits; floats are widened
to float64 and their bit pattern is hashed (every NaN becomes one canonical
NaN; -0.0 and 0.0 differ); temporal types hash their stored integer in their
own unit (date64 is hashed as days so that it matches date32 after a Parquet
round trip); decimals hash their 128/256-bit two's complement words; strings
and binaries sum the mixed 8-byte words of their bytes (keyed by word
position) plus a length term; lists mix each element's hash with its position
and the list length (so a null list, an empty list and ``[null]`` differ);
structs mix their children with their positions; dictionary arrays hash their
decoded values; extension types hash their storage.  The checksum is for
detecting accidental differences, not an adversarial-proof (cryptographic)
digest.

Everything is vectorized with numpy over the Arrow buffers, in windows of
:data:`_WINDOW_ROWS` rows.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import DataError
from .types import normalize_type

__all__ = ["NULL_HASH", "Checksum", "batch_checksum", "schema_fingerprint"]

_U64 = np.uint64
_MASK64 = (1 << 64) - 1

#: Hash of a null value (at any nesting level); any fixed, "random" constant.
NULL_HASH = _U64(0x6A09E667F3BCC909)

# Salts keep the hashes of different constructs apart (all arbitrary odd constants).
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_SALT_BYTES_LEN = _U64(0xBB67AE8584CAA73B)
_SALT_BYTES_KEY = _U64(0x3C6EF372FE94F82B)
_SALT_LIST_LEN = _U64(0xA54FF53A5F1D36F1)
_SALT_LIST_KEY = _U64(0x510E527FADE682D1)
_SALT_STRUCT = _U64(0x9B05688C2B3E6C1F)
_SALT_COLUMN = _U64(0x1F83D9ABFB41BD6B)
_SALT_WORD = _U64(0x5BE0CD19137E2179)
_SALT_DATE64 = _U64(0xCBBB9D5DC1059ED9)

_M1 = _U64(0xBF58476D1CE4E5B9)
_M2 = _U64(0x94D049BB133111EB)

# Masks keeping the first k bytes (little endian) of a 64-bit word, k = 0..8.
_BYTE_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [_MASK64], dtype=np.uint64)

# Rows hashed at once; bounds temporary memory for very large batches.
# 16Ki rows keeps each temporary at 128 KiB: cache-resident and below malloc's
# mmap threshold, which measured ~2x faster than 128Ki-row windows.
_WINDOW_ROWS = 1 << 14

_MS_PER_DAY = 86_400_000


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer, **in place** on a uint64 array we own; returns it.

    numpy uint64 array arithmetic wraps modulo 2**64, which is what we want.
    One scratch array is reused to keep allocations (and page faults) down.
    """
    t = z >> _U64(30)
    z ^= t
    z *= _M1
    np.right_shift(z, _U64(27), out=t)
    z ^= t
    z *= _M2
    np.right_shift(z, _U64(31), out=t)
    z ^= t
    return z


def _make_keys(count: int, salt: np.uint64) -> np.ndarray:
    return _mix(np.arange(count, dtype=np.uint64) + salt) | _U64(1)


_KEY_CACHE: dict[int, np.ndarray] = {}
_KEY_CACHE_SIZE = 256


def _keys(count: int, salt: np.uint64) -> np.ndarray:
    """Pseudo-random odd 64-bit keys for positions 0..count-1 (read-only).

    Odd keys make ``hash * key`` a bijection mod 2**64, so when well-mixed
    hashes are combined as ``sum(hash_i * key_i)`` a change in any single
    component always changes the sum, and the position matters.  The first
    256 keys per salt are cached (2 KiB each); they are needed per column and
    per window, and computing them showed up in profiles.
    """
    if count > _KEY_CACHE_SIZE:
        return _make_keys(count, salt)
    cached = _KEY_CACHE.get(int(salt))
    if cached is None:
        cached = _make_keys(_KEY_CACHE_SIZE, salt)
        cached.flags.writeable = False
        _KEY_CACHE[int(salt)] = cached
    return cached[:count]


# --- buffers --------------------------------------------------------------------


def _validity(arr: pa.Array) -> np.ndarray | None:
    """Boolean validity of ``arr`` (respecting its offset), or None if no nulls."""
    if arr.null_count == 0:
        return None
    buf = arr.buffers()[0]
    if buf is None:  # e.g. the null type: every slot is null
        return np.zeros(len(arr), dtype=bool)
    return _bits(buf, arr.offset, len(arr))


def _bits(buf: pa.Buffer, offset: int, n: int) -> np.ndarray:
    """Unpack an LSB-first bitmap slice into a bool array."""
    first, last = offset // 8, (offset + n + 7) // 8
    raw = np.frombuffer(buf, dtype=np.uint8, count=last - first, offset=first)
    start = offset - first * 8
    return np.unpackbits(raw, bitorder="little")[start : start + n].view(bool)


def _values(arr: pa.Array, dtype: Any) -> np.ndarray:
    """Zero-copy numpy view of a fixed-width array's value buffer (with offset)."""
    dtype = np.dtype(dtype)
    buf = arr.buffers()[1]
    return np.frombuffer(buf, dtype=dtype, count=len(arr), offset=arr.offset * dtype.itemsize)


def _words(arr: pa.Array, byte_width: int) -> np.ndarray:
    """Fixed-width values as a (n, byte_width // 8) uint64 matrix."""
    raw = np.frombuffer(
        arr.buffers()[1], dtype=np.uint8, count=len(arr) * byte_width, offset=arr.offset * byte_width
    )
    return raw.view(np.uint64).reshape(len(arr), byte_width // 8)


# --- value hashing ----------------------------------------------------------------
#
# Every helper returns a fresh uint64 array that the caller may modify in place.

_HASH_FALSE = _mix(np.array([0], dtype=np.uint64) + _GOLDEN)[0]
_HASH_TRUE = _mix(np.array([1], dtype=np.uint64) + _GOLDEN)[0]


def _hash_owned(z: np.ndarray) -> np.ndarray:
    """Hash 64-bit values in ``z``, an array we own (it is overwritten)."""
    z = z.view(np.uint64)
    z += _GOLDEN
    return _mix(z)


def _hash_ints(values: np.ndarray, signed: bool = True) -> np.ndarray:
    """Hash integers of any width, sign- or zero-extended to 64 bits.

    ``astype`` always copies, so Arrow's (read-only) buffers are never written.
    """
    return _hash_owned(values.astype(np.int64 if signed else np.uint64))


def _hash_word_rows(words: np.ndarray) -> np.ndarray:
    """Hash rows of a (n, k) uint64 matrix (decimals, intervals): a mix chain."""
    h = _mix(words[:, 0] + _GOLDEN)
    keys = _keys(words.shape[1], _SALT_WORD)
    for j in range(1, words.shape[1]):
        h ^= words[:, j]
        h += keys[j]
        h = _mix(h)
    return h


# Above this many 8-byte words in the longest string, words are enumerated in
# one flat array instead of one Python-level pass per word position.
_MAX_WORD_PASSES = 32


def _hash_bytes(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Hash byte strings ``data[starts[i]:starts[i]+lengths[i]]``, vectorized.

    A string is read as little-endian 8-byte words w_0..w_k (the tail word
    masked to the string's bytes; an empty string has one all-zero word).  Its
    hash is ``sum_j mix(w_j + key_j) + (length ^ salt) * key_len``.  Mixing each
    word before summing matters: a plain ``sum(w_j * key_j)`` lets two flips of
    bit 63 cancel (2**63 + 2**63 == 0 mod 2**64), which UTF-8 text hits easily.
    """
    n = len(starts)
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    size = len(data)
    max_words = max((int(lengths.max()) + 7) >> 3, 1)
    # Zero padding keeps every 8-byte read inside the buffer.
    padded = np.zeros(size + 8, dtype=np.uint8)
    padded[:size] = data
    # Unaligned overlapping view: element k is the little-endian uint64 at byte k.
    at = np.ndarray((size + 1,), dtype="<u8", buffer=padded, strides=(1,))
    keys = _keys(max_words, _SALT_BYTES_KEY)

    if max_words <= _MAX_WORD_PASSES:
        # Word 0 of every string, then word j only of the strings that have it:
        # the selection shrinks each pass, so skewed lengths cost nothing extra.
        acc = _hash_words(at, starts, lengths, keys[0])
        idx = np.flatnonzero(lengths > 8)
        j = 1
        while idx.size:
            rest = lengths[idx] - 8 * j
            acc[idx] += _hash_words(at, starts[idx] + 8 * j, rest, keys[j])
            idx = idx[rest > 8]
            j += 1
    else:
        counts = np.maximum((lengths + 7) >> 3, 1)
        first = np.cumsum(counts) - counts
        total = int(first[-1] + counts[-1])
        j = np.arange(total, dtype=np.int64) - np.repeat(first, counts)
        offset = 8 * j
        words = _hash_words(
            at, np.repeat(starts, counts) + offset, np.repeat(lengths, counts) - offset, keys[j]
        )
        acc = _segment_sums(words, first, counts)
    tail = lengths.view(np.uint64) ^ _SALT_BYTES_LEN
    tail *= _KEY_BYTES_LEN
    acc += tail
    return acc


def _hash_words(at: np.ndarray, pos: np.ndarray, remaining: np.ndarray, key: Any) -> np.ndarray:
    """``mix(word + key)`` of the words at byte positions ``pos``.

    ``remaining`` is how many bytes of the string are left from ``pos``; bytes
    beyond it (the next string, or padding) are masked off.
    """
    w = at[pos]
    w &= _BYTE_MASKS[np.minimum(remaining, 8)]
    w += key
    return _mix(w)


_KEY_BYTES_LEN = _U64(0xD6E8FEB86659FD93)


def _segment_sums(values: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Wrapping uint64 sums of ``values[starts[i]:starts[i]+counts[i]]``.

    Prefix sums wrap mod 2**64, and so does their difference, so the result is
    exact; unlike ``np.add.reduceat`` empty segments correctly give 0.
    """
    prefix = np.zeros(len(values) + 1, dtype=np.uint64)
    np.cumsum(values, out=prefix[1:])
    ends = starts + counts
    out = prefix[ends]
    out -= prefix[starts]
    return out


def _offsets(arr: pa.Array, dtype: Any) -> np.ndarray:
    """The n + 1 offsets of a list/binary array (respecting its offset) as int64."""
    dtype = np.dtype(dtype)
    raw = np.frombuffer(
        arr.buffers()[1], dtype=dtype, count=len(arr) + 1, offset=arr.offset * dtype.itemsize
    )
    return raw.astype(np.int64)


def _hash_binary_like(arr: pa.Array, offset_dtype: Any) -> np.ndarray:
    offsets = _offsets(arr, offset_dtype)
    base, end = int(offsets[0]), int(offsets[-1])
    buf = arr.buffers()[2]
    data = (
        np.frombuffer(buf, dtype=np.uint8, count=end - base, offset=base)
        if buf is not None and end > base
        else np.empty(0, dtype=np.uint8)
    )
    lengths = np.diff(offsets)
    starts = offsets[:-1]
    starts -= base
    return _hash_bytes(data, starts, lengths)


def _hash_fixed_binary(arr: pa.Array) -> np.ndarray:
    width = arr.type.byte_width
    n = len(arr)
    data = np.frombuffer(arr.buffers()[1], dtype=np.uint8, count=n * width, offset=arr.offset * width)
    return _hash_bytes(data, np.arange(n, dtype=np.int64) * width, np.full(n, width, np.int64))


def _hash_list(offsets: np.ndarray, child: pa.Array) -> np.ndarray:
    """Lists: ``mix(sum_k element_k * key_k + mix(length))``, keys by position.

    ``offsets`` (n + 1 entries, int64) index into ``child``; only the part of
    ``child`` the lists use is hashed.  Null and empty lists get the same
    value here -- null-ness is applied by the caller.
    """
    base, end = int(offsets[0]), int(offsets[-1])
    starts = offsets[:-1] - base
    lengths = np.diff(offsets)
    acc = _mix(lengths.view(np.uint64) + _SALT_LIST_LEN)
    if end > base:
        elements = _hash_array(child.slice(base, end - base))
        position = np.arange(end - base, dtype=np.int64)
        position -= np.repeat(starts, lengths)
        elements *= _keys(int(lengths.max()), _SALT_LIST_KEY)[position]
        acc += _segment_sums(elements, starts, lengths)
    return _mix(acc)


def _hash_struct(arr: pa.StructArray) -> np.ndarray:
    """Structs: ``mix(sum_i child_i * key_i + salt)``, keys by field position."""
    acc = np.full(len(arr), _SALT_STRUCT, dtype=np.uint64)
    keys = _keys(arr.type.num_fields, _SALT_STRUCT)
    for i in range(arr.type.num_fields):
        h = _hash_array(arr.field(i))  # .field() respects the struct's offset
        h *= keys[i]
        acc += h
    return _mix(acc)


def _hash_values(arr: pa.Array) -> np.ndarray:
    """Hash every slot of ``arr``; slots that are null may hold anything."""
    t = arr.type
    n = len(arr)
    if pa.types.is_null(t):
        return np.full(n, NULL_HASH, dtype=np.uint64)
    if pa.types.is_boolean(t):
        return np.where(_bits(arr.buffers()[1], arr.offset, n), _HASH_TRUE, _HASH_FALSE)
    if pa.types.is_signed_integer(t) or pa.types.is_unsigned_integer(t):
        # Sign-/zero-extend to 64 bits so equal values hash alike in any width.
        return _hash_ints(_values(arr, t.to_pandas_dtype()), pa.types.is_signed_integer(t))
    if pa.types.is_floating(t):
        values = _values(arr, t.to_pandas_dtype()).astype(np.float64)
        nan = np.isnan(values)
        if nan.any():
            values[nan] = np.nan  # canonical NaN bit pattern
        return _hash_owned(values)
    if pa.types.is_date64(t):
        ms = _values(arr, np.int64)
        days, rem = np.divmod(ms, _MS_PER_DAY)
        # Whole days hash like date32; a (non-standard) time-of-day still counts.
        return _hash_owned(days.view(np.uint64) ^ (rem.view(np.uint64) * _SALT_DATE64))
    if pa.types.is_temporal(t) and not pa.types.is_interval(t):
        # date32, time32/64, timestamp, duration: the stored integer in its unit.
        width = t.bit_width
        return _hash_ints(_values(arr, np.int32 if width == 32 else np.int64))
    if pa.types.is_interval(t):
        if t == pa.month_day_nano_interval():
            return _hash_word_rows(_words(arr, 16))
        return _hash_ints(_values(arr, np.int32 if t.bit_width == 32 else np.int64))
    if pa.types.is_decimal(t):
        width = t.byte_width
        if width >= 16:
            return _hash_word_rows(_words(arr, width))
        return _hash_ints(_values(arr, np.int32 if width == 4 else np.int64))
    if pa.types.is_string(t) or pa.types.is_binary(t):
        return _hash_binary_like(arr, np.int32)
    if pa.types.is_large_string(t) or pa.types.is_large_binary(t):
        return _hash_binary_like(arr, np.int64)
    if pa.types.is_string_view(t):
        return _hash_values(arr.cast(pa.large_string()))
    if pa.types.is_binary_view(t):
        return _hash_values(arr.cast(pa.large_binary()))
    if pa.types.is_fixed_size_binary(t):
        return _hash_fixed_binary(arr)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_map(t):
        offsets = _offsets(arr, np.int64 if pa.types.is_large_list(t) else np.int32)
        return _hash_list(offsets, arr.values)
    if pa.types.is_fixed_size_list(t):
        size = t.list_size
        offsets = (np.arange(n + 1, dtype=np.int64) + arr.offset) * size
        return _hash_list(offsets, arr.values)
    if pa.types.is_list_view(t) or pa.types.is_large_list_view(t):
        return _hash_values(arr.cast(pa.large_list(t.value_field)))
    if pa.types.is_struct(t):
        return _hash_struct(arr)
    if pa.types.is_dictionary(t):
        # Hash the (small) dictionary once and gather: equals the decoded hash.
        dictionary = _hash_array(arr.dictionary)
        if len(dictionary) == 0:
            return np.full(n, NULL_HASH, dtype=np.uint64)
        indices = _values(arr.indices, t.index_type.to_pandas_dtype())
        # mode="clip": index slots under nulls may hold any value.
        return dictionary.take(indices, mode="clip")
    if isinstance(t, pa.BaseExtensionType):
        return _hash_array(arr.storage)
    if pa.types.is_run_end_encoded(t):
        return _hash_array(pc.run_end_decode(arr))
    raise _unsupported(t)


def _unsupported(t: pa.DataType) -> DataError:
    return DataError(
        f"cannot checksum Arrow type {t}; cast the column to a supported type "
        "(numbers, strings, binary, temporal, decimal, list, struct, dictionary)"
    )


def _hash_array(arr: pa.Array) -> np.ndarray:
    """Hash every value of ``arr``, nulls as :data:`NULL_HASH`."""
    h = _hash_values(arr)
    valid = _validity(arr)
    if valid is not None:
        np.copyto(h, NULL_HASH, where=~valid)
    return h


# --- row hashes and the accumulator ---------------------------------------------


def _row_hashes(columns: list[pa.Array], n: int) -> np.ndarray:
    acc = np.zeros(n, dtype=np.uint64)
    keys = _keys(len(columns), _SALT_COLUMN)
    for i, column in enumerate(columns):
        h = _hash_array(column)
        h *= keys[i]
        acc += h
    # Without this final mix the sum over rows would not depend on which values
    # share a row (the column sums could be taken separately).
    return _mix(acc)


def schema_fingerprint(schema: pa.Schema) -> str:
    """Short digest of column names and (logical) types, in order.

    Types are normalized with :func:`ferry.backends.types.normalize_type`, so
    dictionary vs plain or ``string`` vs ``large_string`` do not matter, matching
    the value hashes; nullability and metadata are ignored.
    """
    text = "\x1e".join(f"{f.name}\x1f{normalize_type(f.type)}" for f in schema)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _as_table_or_batch(data: pa.RecordBatch | pa.Table) -> pa.RecordBatch | pa.Table:
    if not isinstance(data, (pa.RecordBatch, pa.Table)):
        raise TypeError(f"expected a pyarrow RecordBatch or Table, got {type(data).__name__}")
    return data


class Checksum:
    """Running order-independent checksum of record batches.

    ``update`` with batches in any order and split, or ``combine`` checksums of
    partitions computed separately: the result depends only on the multiset of
    rows.  ``value`` is an int in ``[0, 2**64)``; ``rows`` counts rows and
    ``schema_fingerprint`` identifies the column names and types (None until the
    first update).
    """

    __slots__ = ("rows", "value", "schema_fingerprint")

    def __init__(self, rows: int = 0, value: int = 0, schema_fingerprint: str | None = None):
        self.rows = rows
        self.value = value & _MASK64
        self.schema_fingerprint = schema_fingerprint

    def update(self, data: pa.RecordBatch | pa.Table) -> Checksum:
        """Add the rows of a batch or table; returns ``self`` for chaining."""
        data = _as_table_or_batch(data)
        fingerprint = schema_fingerprint(data.schema)
        self._check_schema(fingerprint, record=False)
        batches = (
            data.to_batches(max_chunksize=_WINDOW_ROWS) if isinstance(data, pa.Table) else [data]
        )
        total = 0
        for batch in batches:
            for start in range(0, batch.num_rows, _WINDOW_ROWS):
                window = batch.slice(start, _WINDOW_ROWS)
                rows = _row_hashes(window.columns, window.num_rows)
                total += int(rows.sum(dtype=np.uint64))
        self._check_schema(fingerprint)
        self.value = (self.value + total) & _MASK64
        self.rows += data.num_rows
        return self

    def combine(self, other: Checksum) -> Checksum:
        """Checksum of the union of both inputs (a new object)."""
        merged = Checksum(self.rows, self.value, self.schema_fingerprint)
        merged._check_schema(other.schema_fingerprint)
        merged.rows += other.rows
        merged.value = (merged.value + other.value) & _MASK64
        return merged

    __add__ = combine

    def _check_schema(self, fingerprint: str | None, record: bool = True) -> None:
        if fingerprint is None:
            return
        if self.schema_fingerprint is None:
            if record:
                self.schema_fingerprint = fingerprint
        elif self.schema_fingerprint != fingerprint:
            raise ValueError(
                "cannot combine checksums of different schemas "
                f"(fingerprints {self.schema_fingerprint} and {fingerprint}); "
                "checksum each schema separately"
            )

    def hexdigest(self) -> str:
        """The value as 16 lowercase hex digits."""
        return f"{self.value:016x}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form: rows, checksum (hex) and schema fingerprint."""
        return {
            "rows": self.rows,
            "checksum": self.hexdigest(),
            "schema_fingerprint": self.schema_fingerprint,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Checksum:
        """Inverse of :meth:`to_dict`."""
        return cls(int(data["rows"]), int(data["checksum"], 16), data.get("schema_fingerprint"))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Checksum):
            return NotImplemented
        return (self.rows, self.value, self.schema_fingerprint) == (
            other.rows,
            other.value,
            other.schema_fingerprint,
        )

    def __hash__(self) -> int:
        return hash((self.rows, self.value, self.schema_fingerprint))

    def __repr__(self) -> str:
        return (
            f"Checksum(rows={self.rows}, value=0x{self.hexdigest()}, "
            f"schema_fingerprint={self.schema_fingerprint!r})"
        )


def batch_checksum(data: pa.RecordBatch | pa.Table) -> int:
    """Order-independent checksum (int in ``[0, 2**64)``) of one batch or table."""
    return Checksum().update(data).value

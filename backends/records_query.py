"""The record API's :class:`Query`: a filter, sort keys, offset, limit and a projection.

A query is immutable: every builder method returns a new query, so a query
can be shared, cached (the guide hashes ``query.to_dict()``) and reused::

    Query().limit(100)
    Query({"status": "active"}).sort("age", "desc").sort("name").offset(20).limit(10)
    Query().filter("age", "between", [18, 65]).select("name", "age")

Filters are the foundation's filter model (:mod:`ferry.backends.filters`):
a dict in any form :func:`~ferry.backends.filters.parse_filter` accepts, or a
:class:`~ferry.backends.filters.Filter`. Calling :meth:`Query.where` or
:meth:`Query.filter` several times combines the conditions with ``and``.
The meaning of every operator on records is in docs/records.md and in
:mod:`ferry.backends.records_reference`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .errors import ConfigurationError
from .filters import And, Filter, parse_filter

__all__ = ["Query", "SortKey"]

_ORDERS = ("asc", "desc")


@dataclass(frozen=True)
class SortKey:
    """One sort key: a field and ``asc`` or ``desc``."""

    field: str
    order: str = "asc"

    def __post_init__(self) -> None:
        if not isinstance(self.field, str) or not self.field:
            raise ConfigurationError(f"a sort key needs a field name, got {self.field!r}", path="query.sort")
        order = str(self.order).lower()
        if order not in _ORDERS:
            raise ConfigurationError(f"sort order must be 'asc' or 'desc', got {self.order!r}", path="query.sort")
        object.__setattr__(self, "order", order)

    @property
    def descending(self) -> bool:
        """True for ``desc``."""
        return self.order == "desc"

    def to_dict(self) -> dict[str, str]:
        """``{"field": ..., "order": ...}``."""
        return {"field": self.field, "order": self.order}


class Query:
    """What to read: filter, sort keys, offset, limit and selected fields (immutable)."""

    __slots__ = ("_filter", "_sort", "_limit", "_offset", "_select")

    def __init__(
        self,
        filter: Filter | Mapping[str, Any] | None = None,
        *,
        sort: Iterable[SortKey | tuple[str, str] | str] = (),
        limit: int | None = None,
        offset: int = 0,
        select: Iterable[str] | None = None,
    ) -> None:
        self._filter = _as_filter(filter)
        self._sort = tuple(_as_sort_key(item) for item in sort)
        self._limit = _check_count(limit, "limit", allow_none=True)
        self._offset = _check_count(offset, "offset", allow_none=False)
        self._select = _as_select(select)

    # -- read access ---------------------------------------------------------------

    @property
    def filter_spec(self) -> Filter | None:
        """The combined filter, or None for every record."""
        return self._filter

    @property
    def sort_keys(self) -> tuple[SortKey, ...]:
        """Sort keys, most significant first."""
        return self._sort

    @property
    def limit_value(self) -> int | None:
        """At most this many records (None: no limit)."""
        return self._limit

    @property
    def offset_value(self) -> int:
        """Records skipped before the first one returned."""
        return self._offset

    @property
    def select_fields(self) -> tuple[str, ...] | None:
        """Fields kept in returned records (None: all)."""
        return self._select

    # -- builders ------------------------------------------------------------------

    def _with(self, **changes: Any) -> "Query":
        new = Query.__new__(Query)
        for name in self.__slots__:
            object.__setattr__(new, name, changes.get(name, getattr(self, name)))
        return new

    def where(self, filter: Filter | Mapping[str, Any]) -> "Query":
        """Add a condition (a filter dict or Filter); several conditions are and-ed."""
        added = _as_filter(filter)
        if self._filter is None:
            return self._with(_filter=added)
        return self._with(_filter=And((self._filter, added)))

    def filter(self, field: str, op: str = "eq", value: Any = None) -> "Query":
        """Add ``field <op> value`` (same operators as the filter model), and-ed with the rest."""
        data: dict[str, Any] = {"column": field, "op": op}
        if value is not None or op != "exists":
            data["value"] = value
        return self.where(parse_filter(data, path="query.filter"))

    def sort(self, field: str, order: str = "asc") -> "Query":
        """Add a sort key after the existing ones (ties keep their order by record id)."""
        return self._with(_sort=self._sort + (SortKey(field, order),))

    sort_by = sort

    def limit(self, count: int | None) -> "Query":
        """Return at most ``count`` records (None removes the limit)."""
        return self._with(_limit=_check_count(count, "limit", allow_none=True))

    def offset(self, count: int) -> "Query":
        """Skip the first ``count`` matching records (after sorting)."""
        return self._with(_offset=_check_count(count, "offset", allow_none=False))

    def select(self, *fields: str | Iterable[str]) -> "Query":
        """Keep only these fields in returned records (the record id is always kept)."""
        flat: list[str] = []
        for item in fields:
            flat.extend([item] if isinstance(item, str) else list(item))
        return self._with(_select=_as_select(flat))

    # -- canonical form --------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Canonical JSON-friendly form: equal queries give equal dicts (``from_dict`` inverts it)."""
        return {
            "filter": self._filter.to_dict() if self._filter is not None else None,
            "sort": [key.to_dict() for key in self._sort],
            "offset": self._offset,
            "limit": self._limit,
            "select": list(self._select) if self._select is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Query":
        """Build a query from :meth:`to_dict`'s shape (every key optional)."""
        if not isinstance(data, Mapping):
            raise ConfigurationError(f"a query is a mapping, got {type(data).__name__}", path="query")
        unknown = sorted(set(data) - {"filter", "sort", "offset", "limit", "select"})
        if unknown:
            raise ConfigurationError(
                f"unknown query key(s) {', '.join(unknown)}; expected filter, sort, offset, limit, select",
                path="query",
            )
        sort = [SortKey(item["field"], item.get("order", "asc")) if isinstance(item, Mapping) else item
                for item in data.get("sort") or ()]
        return cls(
            data.get("filter"),
            sort=sort,
            limit=data.get("limit"),
            offset=data.get("offset") or 0,
            select=data.get("select"),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Query) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True, default=str))

    def __repr__(self) -> str:
        return f"Query({json.dumps(self.to_dict(), sort_keys=True, default=str)})"


def _as_filter(value: Filter | Mapping[str, Any] | None) -> Filter | None:
    if value is None or isinstance(value, Filter):
        return value
    if isinstance(value, Mapping):
        return parse_filter(dict(value), path="query.filter")
    raise ConfigurationError(
        f"a query filter is a mapping such as {{'age': {{'gt': 30}}}} or a Filter, got {type(value).__name__}",
        path="query.filter",
    )


def _as_sort_key(item: SortKey | tuple[str, str] | str) -> SortKey:
    if isinstance(item, SortKey):
        return item
    if isinstance(item, str):
        return SortKey(item)
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return SortKey(item[0], item[1])
    raise ConfigurationError(f"a sort key is a field name or (field, order), got {item!r}", path="query.sort")


def _check_count(value: Any, name: str, *, allow_none: bool) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"{name} must be a whole number >= 0, got {value!r}", path=f"query.{name}")
    return value


def _as_select(fields: Iterable[str] | None) -> tuple[str, ...] | None:
    if fields is None:
        return None
    if isinstance(fields, str):
        fields = [fields]
    result = tuple(dict.fromkeys(fields))
    for name in result:
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"select takes field names, got {name!r}", path="query.select")
    return result


"""Time single pages of the test server's point in time against its scroll.

``python -m benchmarks.osmem_pit_pages [DOCUMENTS]`` starts an osmem-server,
loads DOCUMENTS small documents (default 100,000) with plain HTTP bulk
requests, then reads them all back three ways, printing the seconds of each
page: a point in time paged with ``search_after`` on ``_shard_doc`` at 1,000
and at 10,000 hits a page, and a scroll of 5,000 hits a page. It shows what
a page costs on this server as the index grows, apart from any client.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from typing import Any


def _call(url: str, method: str, path: str, body: Any = None, *, ndjson: bool = False) -> dict:
    data = None if body is None else (body.encode() if isinstance(body, str) else json.dumps(body).encode())
    content_type = "application/x-ndjson" if ndjson else "application/json"
    request = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read() or b"{}")


def _load(url: str, documents: int) -> None:
    _call(url, "PUT", "/pages", {"settings": {"number_of_replicas": 0, "refresh_interval": "-1"}})
    for start in range(0, documents, 5000):
        lines = []
        for i in range(start, min(documents, start + 5000)):
            lines.append(json.dumps({"index": {"_id": str(i)}}))
            lines.append(json.dumps({"n": i, "status": f"status-{i % 7}", "amount": i * 0.5, "tags": ["a", "b"]}))
        _call(url, "POST", "/pages/_bulk", "\n".join(lines) + "\n", ndjson=True)
    _call(url, "POST", "/pages/_refresh")


def pit_pages(url: str, size: int) -> list[float]:
    """Seconds of each point-in-time page of ``size`` hits, first to last."""
    pit = _call(url, "POST", "/pages/_search/point_in_time?keep_alive=5m")["pit_id"]
    after, seconds = None, []
    while True:
        body: dict[str, Any] = {"size": size, "pit": {"id": pit, "keep_alive": "5m"}, "sort": [{"_shard_doc": "asc"}], "track_total_hits": False}
        if after is not None:
            body["search_after"] = after
        started = time.perf_counter()
        hits = _call(url, "POST", "/_search", body)["hits"]["hits"]
        seconds.append(time.perf_counter() - started)
        if len(hits) < size:
            return seconds
        after = hits[-1]["sort"]


def scroll_pages(url: str, size: int) -> list[float]:
    """Seconds of each scroll page of ``size`` hits, first to last."""
    started = time.perf_counter()
    response = _call(url, "POST", "/pages/_search?scroll=5m", {"size": size, "sort": ["_doc"]})
    seconds = [time.perf_counter() - started]
    while response["hits"]["hits"]:
        started = time.perf_counter()
        response = _call(url, "POST", "/_search/scroll", {"scroll": "5m", "scroll_id": response["_scroll_id"]})
        seconds.append(time.perf_counter() - started)
    return seconds


def _describe(name: str, seconds: list[float]) -> str:
    ordered = sorted(seconds)
    return (
        f"{name}: {len(seconds)} pages in {sum(seconds):.2f}s, median page {ordered[len(ordered) // 2]:.3f}s, "
        f"first {seconds[0]:.3f}s, last {seconds[-1]:.3f}s"
    )


def main() -> None:
    from tests.integration.es_server import running_osmem_server

    documents = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    with running_osmem_server() as ready:
        url = ready["url"]
        started = time.perf_counter()
        _load(url, documents)
        print(f"{documents:,} documents loaded in {time.perf_counter() - started:.1f}s")
        for size in (1000, 10000):
            print(_describe(f"point in time, {size:,} hits a page", pit_pages(url, size)))
        print(_describe("scroll, 5,000 hits a page", scroll_pages(url, 5000)))


if __name__ == "__main__":
    main()

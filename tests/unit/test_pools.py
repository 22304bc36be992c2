"""The pool manager: one pool per configuration and event loop, shared, reference counted."""

from __future__ import annotations

import asyncio
import threading

from ferry.backends import ObjectStoreBackend
from ferry.backends.pools import PoolManager


class FakePool:
    """A stand-in resource that records whether it was closed."""

    created = 0

    def __init__(self) -> None:
        FakePool.created += 1
        self.closed = False

    async def close(self) -> None:
        self.closed = True


async def _make() -> FakePool:
    await asyncio.sleep(0.01)  # let concurrent callers race the creation
    return FakePool()


def test_one_pool_per_config_and_loop_shared_and_closed_by_last_user():
    manager = PoolManager()

    async def scenario():
        FakePool.created = 0
        pools = await asyncio.gather(
            *(manager.acquire("fake", "cfg", _make, closer=lambda p: p.close(), stats=lambda p: {"size": 1}) for _ in range(8))
        )
        assert FakePool.created == 1 and all(p is pools[0] for p in pools)
        info = manager.get_pool_info()
        assert manager.get_pool_count() == 1
        (entry,) = info.values()
        assert entry["users"] == 8 and entry["config_hash"] == "cfg" and entry["size"] == 1
        assert entry["loop_id"] == id(asyncio.get_running_loop())
        other = await manager.acquire("fake", "other-cfg", _make, closer=lambda p: p.close())
        assert other is not pools[0] and manager.get_pool_count() == 2
        for _ in range(7):
            await manager.release("fake", "cfg")
        assert not pools[0].closed
        await manager.release("fake", "cfg")
        assert pools[0].closed
        await manager.release("fake", "other-cfg")
        assert manager.get_pool_count() == 0

    asyncio.run(scenario())


def test_pools_never_cross_event_loops():
    manager = PoolManager()
    seen = []

    def in_thread():
        async def use():
            pool = await manager.acquire("fake", "cfg", _make, closer=lambda p: p.close())
            seen.append(pool)
            await manager.release("fake", "cfg")

        asyncio.run(use())

    threads = [threading.Thread(target=in_thread) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 2 and seen[0] is not seen[1]
    assert all(p.closed for p in seen)


def test_object_store_filesystems_are_listed(tmp_path):
    from ferry.backends import get_pool_info

    async def scenario():
        async with ObjectStoreBackend(url=str(tmp_path)) as a, ObjectStoreBackend(url=str(tmp_path)).fresh() as b:
            rows = [v for v in get_pool_info().values() if v["kind"] == "objectstore-file"]
            assert len(rows) == 1 and rows[0]["users"] >= 2
            assert a._live["filesystems"] is b._live["filesystems"]

    asyncio.run(scenario())

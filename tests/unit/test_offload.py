"""The offload thread: results, errors and order come back to the awaiting request; inline when not running."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serving.offload import Offloader


def test_results_and_errors_reach_the_awaiting_coroutine_from_another_thread() -> None:
    off = Offloader(1)
    off.start()
    seen: set[int | None] = set()

    def work(x: int) -> tuple[int, int | None]:
        seen.add(threading.get_ident())
        if x == 13:
            raise ValueError("thirteen")
        return x * x, threading.get_ident()

    async def main() -> list[object]:
        return await asyncio.gather(*(off(work, i) for i in range(40)), return_exceptions=True)

    try:
        out = asyncio.run(main())
    finally:
        off.stop()
    assert [o[0] for i, o in enumerate(out) if i != 13] == [i * i for i in range(40) if i != 13]  # type: ignore[index]
    assert isinstance(out[13], ValueError) and str(out[13]) == "thirteen"
    assert seen and threading.get_ident() not in seen  # the calls ran on the offload thread


def test_not_started_or_stopped_runs_inline() -> None:
    off = Offloader(1)

    async def where() -> int:
        return await off(threading.get_ident)

    assert asyncio.run(where()) == threading.get_ident()  # before start: inline
    off.start()
    assert asyncio.run(where()) != threading.get_ident()
    off.stop()
    assert not off.running and asyncio.run(where()) == threading.get_ident()
    zero = Offloader(0)
    zero.start()
    assert not zero.running and asyncio.run(where()) == threading.get_ident()
    with pytest.raises(ValueError):
        Offloader(-1)


def test_stop_finishes_what_was_queued() -> None:
    off = Offloader(1)
    off.start()
    gate = threading.Event()
    done: list[int] = []

    async def main() -> None:
        fut = asyncio.ensure_future(off(gate.wait))
        later = [asyncio.ensure_future(off(done.append, i)) for i in range(5)]
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(fut, *later)

    asyncio.run(main())
    off.stop()
    assert done == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(("group", "hand_backs"), [(4, 3), (1, 10)])
def test_queued_results_go_back_in_groups_with_one_wake_up_each(group: int, hand_backs: int) -> None:
    """10 calls queued behind a blocked one come back in ceil(10 / group) hand-offs, every result in place."""
    off = Offloader(1, group=group)
    off.start()
    gate = threading.Event()

    def work(x: int) -> int:
        if x == 0:
            gate.wait(5)
        if x == 6:
            raise KeyError("six")
        return x * 10

    async def main() -> tuple[list[object], int]:
        loop = asyncio.get_running_loop()
        calls = 0
        plain = loop.call_soon_threadsafe

        def counting(*args: object, **kwargs: object) -> object:
            nonlocal calls
            calls += 1
            return plain(*args, **kwargs)  # type: ignore[arg-type]

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        tasks = [asyncio.ensure_future(off(work, i)) for i in range(10)]
        await asyncio.sleep(0.05)  # all ten are queued; the first holds the thread
        gate.set()
        out = await asyncio.gather(*tasks, return_exceptions=True)
        return out, calls

    try:
        out, calls = asyncio.run(main())
    finally:
        off.stop()
    assert [o for i, o in enumerate(out) if i != 6] == [i * 10 for i in range(10) if i != 6]
    assert isinstance(out[6], KeyError)
    assert calls == hand_backs
    with pytest.raises(ValueError):
        Offloader(1, group=0)

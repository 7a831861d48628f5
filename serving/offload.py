"""Run a C call that releases the GIL (a P-256 signature check) on a thread beside the event loop.

The event loop stays free for the Python work of other requests while OpenSSL checks a signature
on the machine's other core. The hand-off is kept lean on purpose: the loop puts one tuple on a
``queue.SimpleQueue`` (C, no lock in Python) and awaits a plain future; the thread answers with
one ``call_soon_threadsafe``. ``loop.run_in_executor`` + ``asyncio.wait_for`` cost the loop
80–120 µs a hop here, more than the signature check they would move (BENCHMARKS.md).

Only work that holds the GIL for a few µs belongs here: Python code run on this thread competes
with the event loop for the GIL and would slow every request down.

Results go back in groups: a thread that finishes a call while more calls are queued runs up to
``group`` of them (default :data:`DELIVERY_GROUP`) before it hands their results to the loop in one
``call_soon_threadsafe``. That is one GIL acquisition and one loop wake-up for several requests, and
the requests resume in the same loop turn, so they also share one ONNX Runtime run. With nothing
queued a result goes back at once: no call ever waits for work that is not there. Measured on the
endpoint: +9 % requests/s, 11 of 11 alternating pairs (BENCHMARKS.md, "Endpoint").
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_STOP = object()
DELIVERY_GROUP = 4  # results handed back together at most (see the module's docstring)


def _deliver(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.done():  # cancelled (the request went away): nobody is waiting
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


def _deliver_all(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in results:
        _deliver(fut, ok, value)


class Offloader:
    """`threads` daemon threads that run submitted calls; ``await offloader(fn, *args)`` returns fn's result.

    With ``threads=0`` the call runs inline on the caller's thread (the same result, no hand-off).
    A call submitted after :meth:`stop` (or before :meth:`start`) also runs inline, so nothing waits on a
    thread that is not there.
    """

    def __init__(self, threads: int = 1, name: str = "retention-offload", *, group: int = DELIVERY_GROUP) -> None:
        if threads < 0:
            raise ValueError("threads must be >= 0")
        if group < 1:
            raise ValueError("group must be >= 1")
        self.n_threads = threads
        self.name = name
        self.group = group
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._running = False

    @property
    def running(self) -> bool:
        """Return True while calls go to the threads (False: they run inline)."""
        return self._running

    def start(self) -> None:
        """Start the threads (idempotent)."""
        if self._running or self.n_threads == 0:
            return
        self._threads = [
            threading.Thread(target=self._work, name=f"{self.name}-{i}", daemon=True) for i in range(self.n_threads)
        ]
        for t in self._threads:
            t.start()
        self._running = True

    def stop(self, timeout: float = 5.0) -> None:
        """Let the threads finish what is queued, then stop them; later calls run inline."""
        if not self._running:
            return
        self._running = False
        for _ in self._threads:
            self._q.put(_STOP)
        for t in self._threads:
            t.join(timeout)
        self._threads = []

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        if not self._running:
            return fn(*args)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._q.put((fn, args, fut, loop))
        return await fut

    def _work(self) -> None:
        q, group = self._q, self.group
        done: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        while True:
            item = q.get()
            n = 0
            while True:  # run what is queued, up to `group` calls, then hand the results back together
                if item is _STOP:
                    self._hand_back(done)
                    return
                fn, args, fut, loop = item
                try:
                    value, ok = fn(*args), True
                except BaseException as exc:  # delivered to the awaiting request, never lost
                    value, ok = exc, False
                done.setdefault(loop, []).append((fut, ok, value))
                n += 1
                if n >= group or q.empty():
                    break
                item = q.get()
            self._hand_back(done)

    @staticmethod
    def _hand_back(done: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]]) -> None:
        for loop, results in done.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
                if len(results) == 1:
                    loop.call_soon_threadsafe(_deliver, *results[0])
                else:
                    loop.call_soon_threadsafe(_deliver_all, results)
        done.clear()

"""Read ahead: ``fn(item)`` for a list of items, computed ahead in threads, yielded in order."""

from __future__ import annotations

import collections
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

__all__ = ["prefetch"]

T = TypeVar("T")
R = TypeVar("R")

def prefetch(items: Iterable[T], fn: Callable[[T], R], workers: int = 2, ahead: int = 4) -> Iterator[R]:
    """Yield ``fn(item)`` for every item, in input order, computed ahead in a thread pool.

    At most ``ahead`` items are submitted but not yet yielded (plus the one the consumer
    holds), so memory stays flat however long ``items`` is; ``items`` is consumed lazily.
    Threads suit I/O and cv2 decoding, which release the GIL. An exception raised by ``fn``
    is re-raised when its item's turn comes (items before it are yielded first) and ends
    the iteration. Closing the iterator early cancels the work not yet started.
    ``workers=0`` runs ``fn`` inline, without threads.
    """
    if ahead < 1:
        raise ValueError(f"ahead must be >= 1, got {ahead}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers == 0:
        for item in items:
            yield fn(item)
        return

    it = iter(items)
    pending: collections.deque[Future[R]] = collections.deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prefetch")
    try:
        def fill() -> None:
            while len(pending) < ahead:
                try:
                    item = next(it)
                except StopIteration:
                    return
                pending.append(pool.submit(fn, item))

        fill()
        while pending:
            future = pending.popleft()
            result = future.result()
            fill()
            yield result
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True)

"""Run a generator and a chain of steps as concurrent threads joined by bounded queues.

torch, OpenCV and PyAV release the GIL in their heavy calls, so threads overlap decoding, inference
and encoding; the bounded queues keep at most `depth` items waiting between two stages, so memory
does not grow with the length of the video.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

_POLL_S = 0.1


class _End:
    """Marks the end of the stream; carries the exception that ended it early, if any."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


def staged(source: Iterable[Any], steps: Sequence[Callable[[Any], Any]], depth: int = 2,
           name: str = "stage") -> Iterator[Any]:
    """Yield each item of `source` passed through every step, in order.

    The source and each step run in their own thread. An exception in any of them is raised here,
    in the consuming thread; when the consumer stops early, the threads finish their current item
    and exit."""
    stop = threading.Event()
    queues: list[queue.Queue[Any]] = [queue.Queue(depth) for _ in range(len(steps) + 1)]

    def put(q: queue.Queue[Any], item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def get(q: queue.Queue[Any]) -> Any:
        while not stop.is_set():
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        return _End()

    def feed() -> None:
        try:
            for item in source:
                if not put(queues[0], item):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            put(queues[0], _End(exc))
            return
        put(queues[0], _End())

    def work(step: Callable[[Any], Any], inbox: queue.Queue[Any], outbox: queue.Queue[Any]) -> None:
        while True:
            item = get(inbox)
            if isinstance(item, _End):
                put(outbox, item)
                return
            try:
                result = step(item)
            except BaseException as exc:
                put(outbox, _End(exc))
                return
            if not put(outbox, result):
                return

    threads = [threading.Thread(target=feed, name=f"{name}-source", daemon=True)]
    threads += [threading.Thread(target=work, args=(step, queues[i], queues[i + 1]), name=f"{name}-{i}", daemon=True)
                for i, step in enumerate(steps)]
    for t in threads:
        t.start()
    try:
        while True:
            item = queues[-1].get()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            yield item
    finally:
        stop.set()
        for t in threads:
            t.join()

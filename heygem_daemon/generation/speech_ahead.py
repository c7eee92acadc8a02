"""Speech ahead of the renders: while the slots render, speech slots speak the scripts of queued tasks into
the speech cache, so a render slot that takes a script task finds its audio made and its GPU never waits
for TTS it could have had earlier.

Only the cache changes: the life cycle does not know about it. The render slot's attempt still speaks
whatever is missing (a part that failed ahead, a task taken before its turn here) and is where failures
are counted and outages waited out; a part being spoken here when the render slot wants it is waited for
through the cache's per-part lock, never spoken twice. A task whose speech failed here is not tried here
again. One child process per speech slot (`speech.ahead_slots`), spawned like a render worker.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from heygem_daemon.clock import SYSTEM_CLOCK, Clock
from heygem_daemon.config import Config
from heygem_daemon.generation.lifecycle import LifeCycle
from heygem_daemon.generation.workers import SPEAK_ONLY, WorkerProcess, task_spec
from heygem_daemon.log import get_logger
from heygem_daemon.media.kinds import MediaKind, kind_of

log = get_logger("heygem.speech")
POLL_SECONDS = 0.5
FILL_EVERY_SECONDS = 10.0
"""Without a wake or a freed slot, the queue is read this seldom: reading every queued task each poll would
cost in proportion to the queue (a burst of thousands of pairs) for an optimisation."""


@dataclass
class _SpeechSlot:
    index: int
    worker: WorkerProcess | None = None
    task_id: int | None = None
    heard_at: float = field(default=0.0)


class SpeechAhead:
    name = "speech"

    def __init__(self, cfg: Config, life: LifeCycle, clock: Clock = SYSTEM_CLOCK) -> None:
        self.cfg, self.life, self.store, self.clock = cfg, life, life.store, clock
        self.wake, self.stop_event = threading.Event(), threading.Event()
        self.slots = [_SpeechSlot(i) for i in range(cfg.speech.ahead_slots)]
        self.tried: set[int] = set()
        self.thread = threading.Thread(target=self._run, name="speech-ahead", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()
        self.thread.join(10)
        for slot in self.slots:
            if slot.worker:
                slot.worker.kill()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def apply(self, cfg: Config) -> None:
        self.cfg = cfg

    def notify(self) -> None:
        self.wake.set()

    def _run(self) -> None:
        woken, next_fill = True, 0.0
        while not self.stop_event.is_set():
            try:
                busy = [s for s in self.slots if s.task_id is not None]
                for slot in self.slots:
                    self._collect(slot)
                freed = any(s.task_id is None for s in busy)
                if woken or freed or self.clock.monotonic() >= next_fill:
                    self._fill()
                    next_fill = self.clock.monotonic() + FILL_EVERY_SECONDS
            except Exception:  # a store hiccup: speech ahead is an optimisation, the renders carry on
                log.exception("speech ahead failed a round")
            woken = self.wake.wait(POLL_SECONDS)
            self.wake.clear()

    def _fill(self) -> None:
        free = [s for s in self.slots if s.task_id is None]
        if not free:
            return
        queued = [t for t in self.store.tasks.select(states=("queued",)) if kind_of(t.audio) is MediaKind.SCRIPT]
        busy = {s.task_id for s in self.slots}
        self.tried &= {t.id for t in queued} | busy  # forget tasks that left the queue
        for task, slot in zip((t for t in queued if t.id not in self.tried), free):
            _, spec = task_spec(self.cfg, self.life, task, "speech")
            if slot.worker is None or not slot.worker.alive():
                slot.worker = WorkerProcess(f"speech-{slot.index}", {}, self.cfg.workers.nice)
            slot.worker.conn.send((SPEAK_ONLY, spec))
            slot.task_id, slot.heard_at = task.id, self.clock.monotonic()
            self.tried.add(task.id)

    def _collect(self, slot: _SpeechSlot) -> None:
        if slot.task_id is None or slot.worker is None:
            return
        try:
            while slot.worker.conn.poll(0):
                msg = slot.worker.conn.recv()
                slot.heard_at = self.clock.monotonic()
                if msg[0] in ("done", "error"):
                    if msg[0] == "error":
                        log.info("speech ahead failed; the render's attempt speaks it", task_id=slot.task_id,
                                 reason=msg[2])
                    slot.task_id = None
                    return
        except (EOFError, OSError):
            self._drop(slot)
            return
        if self.clock.monotonic() - slot.heard_at > self.cfg.workers.stall_seconds:
            self._drop(slot)

    def _drop(self, slot: _SpeechSlot) -> None:
        if slot.worker:
            slot.worker.kill()
        slot.worker, slot.task_id = None, None

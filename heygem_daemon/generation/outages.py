"""A dependency out (an engine service, the task broker, the disk): tasks wait without using attempts. One
outage is one alert (after `workers.outage_alert_seconds`; a wedged service at once) and one "back" note
when it ends; `status` shows what is awaited since when. A down service an engine can ask again is probed
on its own short timer, and the tasks waiting for it go the moment it answers, whatever their backoff.

What a dependency's state is comes from the best witness there is: the engine's own view of its services
(dependencies.py), the remote dispatcher's of the broker and the bucket (`others`), else the tasks that
wait for it (queued, or running again but not past it yet)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from heygem_daemon.clock import SYSTEM_CLOCK, Clock
from heygem_daemon.config import Config
from heygem_daemon.generation.dependencies import OUT_STATES, Dependency, Describe, dependency_sources
from heygem_daemon.log import get_logger
from heygem_daemon.state import Store

log = get_logger("heygem.outages")
CHECK_SECONDS = 10.0
OPEN_CHECK_SECONDS = 1.0
PROBE_TICK_SECONDS = 0.5
_BACK = "Tasks run again by themselves once it is back."

Alert = Callable[[str, str], Any]


def waiting(store: Store) -> list[dict[str, Any]]:
    """What queued tasks wait for: dependency, reason, since (unix time), tasks."""
    return [o for o in store.tasks.outages() if o["since"] is not None]


def when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def describe(outage: dict[str, Any]) -> str:
    return (f"waiting for {outage['dependency']} since {when(outage['since'])} ({outage['tasks']} task(s)): "
            f"{outage['reason']}")


@dataclass(frozen=True)
class Outage:
    dependency: str
    since: float
    message: str
    """The alert's line for it."""
    urgent: bool = False
    """Alerted at once (a wedged service: its own threshold is behind it)."""

    @property
    def mark(self) -> str:
        return f"{self.dependency}@{self.since:.0f}"


def _of_dependency(dep: Dependency, tasks: int) -> Outage:
    text = f"{dep.name} is {dep.state}: {dep.detail}." + (f" {dep.hint}." if dep.hint else "")
    if tasks:
        text += f" {tasks} task(s) wait for it. {_BACK}"
    return Outage(dep.name, dep.since or dep.seen, text, urgent=dep.state == "wedged")


def _of_tasks(waits: dict[str, Any]) -> Outage:
    return Outage(waits["dependency"], waits["since"], f"Generation is {describe(waits)}. {_BACK}")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


class OutageWatch:
    """`check` is called from the daemon's main loop (alerts and back notes); as a component it runs the
    probe of down dependencies on its own thread, so a slow answer never holds the main loop."""

    name = "outages"

    def __init__(self, cfg: Config, store: Store, on_alert: Alert, clock: Clock = SYSTEM_CLOCK,
                 others: Callable[[], list[dict[str, Any]]] = lambda: [],
                 wake: Callable[[], None] = lambda: None, on_back: Alert | None = None) -> None:
        self.cfg, self.store, self.on_alert, self.clock = cfg, store, on_alert, clock
        self.on_back = on_back or on_alert
        # Outages no queued task records (the task broker away while every remote task is in flight).
        self.others = others
        self.wake = wake
        self._sources: list[Describe] = dependency_sources(cfg)
        self._next = 0.0
        self._open: dict[str, Outage] = {}
        """Alerted outages by dependency: a back note is owed when each ends."""
        self._witnessed: set[str] = set()
        """Dependencies `others` has named: their end is its word, not the tasks'."""
        self._others_out: set[str] = set()
        self._next_probe: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- component: the probe thread ----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._probe_loop, name="outage-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def apply(self, cfg: Config) -> None:
        self.cfg, self._sources = cfg, dependency_sources(cfg)

    def _probe_loop(self) -> None:
        while not self._stop.wait(PROBE_TICK_SECONDS):
            try:
                self.probe()
            except Exception:  # a file or the store unreadable for a moment: the next tick asks again
                log.exception("probing dependencies failed; trying again")

    def dependencies(self) -> list[Dependency]:
        return [dep for describe in self._sources for dep in describe()]

    def probe(self) -> list[str]:
        """Ask each down dependency that can be asked, at most every its `probe_every`; the tasks waiting
        for one that answers (or for another of its group) may go now, as may those waiting for what the
        remote dispatcher saw come back. Returns the dependencies asked that answered."""
        deps, now = self.dependencies(), self.clock.time()
        back: list[Dependency] = []
        for dep in deps:
            if dep.state != "down" or dep.probe is None or now < self._next_probe.get(dep.name, 0.0):
                continue
            self._next_probe[dep.name] = now + dep.probe_every
            if dep.probe():
                back.append(dep)
        woken = 0
        for dep in back:
            group = [d.name for d in deps if d.group == dep.group] if dep.group else [dep.name]
            n = self.store.tasks.wake(group, self.clock.time())
            woken += n
            log.info("dependency answers again; the tasks waiting for it go now", dependency=dep.name, tasks=n)
        if woken:
            self.wake()
        if back:
            self._next = 0.0  # the back note goes with the main loop's next turn, not in CHECK_SECONDS
        self._back_from_others({o["dependency"] for o in self.others()}, self.clock.time())
        return [dep.name for dep in back]

    # --- alerts -------------------------------------------------------------------------------------

    def _current(self, now: float) -> tuple[dict[str, Outage], set[str]]:
        """The outages now, by dependency, and the dependencies nothing can say anything about (an engine's
        observation too old to tell)."""
        out: dict[str, Outage] = {}
        described: dict[str, Dependency] = {}
        unknown: set[str] = set()
        for dep in self.dependencies():
            if not dep.fresh(now):
                unknown.add(dep.name)
            else:
                described[dep.name] = dep
        others = self.others()
        self._witnessed |= {o["dependency"] for o in others}
        waits = self.store.tasks.outages(("queued", "running"))
        tasks = {o["dependency"]: o for o in waits if o["since"] is not None}
        for dep in described.values():
            if dep.state in OUT_STATES:
                out[dep.name] = _of_dependency(dep, tasks.get(dep.name, {}).get("tasks", 0))
        for o in others:
            out.setdefault(o["dependency"], _of_tasks(o))
        for name, o in tasks.items():
            if name not in described and name not in self._witnessed and name not in unknown:
                out[name] = _of_tasks(o)
        return out, unknown

    def _back_from_others(self, out: set[str], now: float) -> None:
        """The broker or the bucket answers again (the dispatcher says so): the tasks waiting for it go now."""
        back, self._others_out = self._others_out - out, out
        if back and self.store.tasks.wake(sorted(back), now):
            log.info("dependency answers again; the tasks waiting for it go now", dependencies=sorted(back))
            self.wake()

    def check(self) -> list[str]:
        """Alert once for the outages that became due (all of them in one message), and note the end of
        each alerted one. Returns the keys sent now."""
        now = self.clock.time()
        if now < self._next:
            return []
        self._next = now + CHECK_SECONDS
        out, unknown = self._current(now)
        sent = []
        due = [o for name, o in out.items() if name not in self._open
               and (o.urgent or now - o.since >= self.cfg.workers.outage_alert_seconds)]
        if due:
            key = "outage:" + ",".join(o.mark for o in due)
            message = "\n".join(o.message for o in due)
            log.error("operator alert", alert=key, message=message)
            self.on_alert(key, message)
            self._open.update({o.dependency: o for o in due})
            sent.append(key)
        ended = [o for name, o in self._open.items() if name not in out and name not in unknown]
        if ended:
            key = "back:" + ",".join(o.mark for o in ended)
            message = "\n".join(f"{o.dependency} is back (out since {when(o.since)}, {_duration(now - o.since)}); "
                                f"waiting tasks run again now." for o in ended)
            log.info("operator note", alert=key, message=message)
            self.on_back(key, message)
            for o in ended:
                del self._open[o.dependency]
            sent.append(key)
        if self._open:  # while an alerted outage lasts its end is looked for every turn: the back note is news
            self._next = now + OPEN_CHECK_SECONDS
        return sent


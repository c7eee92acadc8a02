"""Prometheus metrics on an optional local port (`metrics.port`), served from the daemon's process.

Counters and histograms are module objects, so any part of the daemon adds to them with one line
(delivery: `metrics.BYTES_UPLOADED.inc(n)`); gauges that mirror the store are read at scrape time.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from heygem_daemon.config import Config
from heygem_daemon.log import get_logger
from heygem_daemon.state import Store

log = get_logger("heygem.daemon")

REGISTRY = CollectorRegistry(auto_describe=True)
TASK_SECONDS = Histogram(
    "heygem_task_seconds", "Duration of one generation attempt, by device and outcome",
    ["device", "outcome"], registry=REGISTRY,
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf")))
CLEANUP_BYTES = Counter("heygem_cleanup_freed_bytes", "Bytes freed by cleanup sweeps", ["sweep"],
                        registry=REGISTRY)
BYTES_UPLOADED = Counter("heygem_uploaded_bytes", "Bytes uploaded by delivery", registry=REGISTRY)
ATTEMPTS_FAILED = Counter("heygem_failed_attempts", "Failed generation attempts by the problem's kind and what "
                          "followed (queued: tried again later; failed: for good)", ["kind", "then"], registry=REGISTRY)


class StateCollector(Collector):
    """Jobs by state, queue length, busy device slots and the daemon's own state, at scrape time."""

    def __init__(self, store: Store, slots: Callable[[], list[dict[str, Any]]],
                 flags: Callable[[], dict[str, bool]],
                 remote: Callable[[], list[dict[str, Any]]] = lambda: []) -> None:
        self.store, self.slots, self.flags, self.remote = store, slots, flags, remote

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("heygem_jobs", "Jobs in the store by state", labels=["state"])
        for state, n in sorted(self.store.jobs.counts().items()):
            jobs.add_metric([state], n)
        yield jobs
        yield GaugeMetricFamily("heygem_queue_length", "Tasks waiting for a device",
                                value=self.store.tasks.counts().get("queued", 0))
        busy = GaugeMetricFamily("heygem_device_busy", "Device slots running a task", labels=["device"])
        per_device: dict[str, int] = {}
        for slot in self.slots():
            per_device[slot["device"]] = per_device.get(slot["device"], 0) + (slot["task"] is not None)
        for device, n in sorted(per_device.items()):
            busy.add_metric([device], n)
        yield busy
        workers = self.remote()
        if workers:
            running = GaugeMetricFamily("heygem_remote_worker_busy", "Tasks a remote worker runs",
                                        labels=["host", "devices"])
            beat = GaugeMetricFamily("heygem_remote_worker_last_beat", "Unix time of a remote worker's last "
                                     "heartbeat", labels=["host", "devices"])
            quarantined = GaugeMetricFamily("heygem_remote_worker_quarantined", "1 while a remote worker takes "
                                            "no task because its own set-up is wrong", labels=["host", "devices"])
            for w in workers:
                labels = [w["host"], ",".join(w["devices"])]
                running.add_metric(labels, len(w["tasks"]))
                beat.add_metric(labels, w["last_beat"] or 0)
                quarantined.add_metric(labels, int(bool(w.get("problem"))))
            yield running
            yield beat
            yield quarantined
        for name, value in sorted(self.flags().items()):
            yield GaugeMetricFamily(f"heygem_{name}", f"1 while the daemon is {name.replace('_', ' ')}",
                                    value=int(value))


class MetricsServer:
    """The component serving /metrics when metrics.port is set. Bound to 127.0.0.1 only: the endpoint has no
    authentication; put a reverse proxy in front to expose it. A taken port is logged, never fatal."""

    name = "metrics"

    def __init__(self, port: int | None, collector: StateCollector) -> None:
        self.port, self.collector = port, collector
        self._server: Any = None
        self._thread: Any = None

    def start(self) -> None:
        if self.port is None:
            return
        try:
            self._server, self._thread = start_http_server(self.port, addr="127.0.0.1", registry=REGISTRY)
        except OSError as exc:
            # Metrics are a side show: a taken port must not stop video production.
            log.error("cannot serve metrics; running without them", port=self.port, error=exc.strerror,
                      hint="pick a free metrics.port and restart")
            return
        REGISTRY.register(self.collector)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            REGISTRY.unregister(self.collector)
            self._server = None

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def apply(self, cfg: Config) -> None:
        """metrics.port takes effect at the next restart (ops.reload)."""

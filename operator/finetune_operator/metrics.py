"""Prometheus /metrics and /healthz. Jobs by phase and each running job's step, loss and
tokens/s are read from the reconciler at scrape time (the statuses it wrote, the reports it
took); reconciles are counted and timed as they happen."""

from __future__ import annotations

import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from finetune_api.kinds import JOB, KINDS
from finetune_api.status import Progress, State
from finetune_operator.reconcile import Reconciler
from finetune_operator.status import PHASES

# Per running job, from its latest report: metric name, help, the value.
JOB_GAUGES = (
    ("finetune_job_step", "Training step the job reached", lambda p: p.step),
    ("finetune_job_train_loss", "Latest training loss", lambda p: p.metrics.get("train_loss")),
    ("finetune_job_eval_loss", "Latest evaluation loss", lambda p: p.metrics.get("eval_loss")),
    ("finetune_job_tokens_per_second", "Training throughput in tokens per second", lambda p: p.metrics.get("tokens_per_s")),
)


class Metrics:
    def __init__(self, reconciler: Reconciler):
        self.reconciler = reconciler
        self.registry = CollectorRegistry()
        self.reconciles = Histogram("finetune_reconcile_duration_seconds", "Time one reconcile took, by trigger",
                                    ["trigger"], registry=self.registry)
        self.errors = Counter("finetune_reconcile_errors_total", "Reconciles that raised, by trigger",
                              ["trigger"], registry=self.registry)
        self.registry.register(self)

    @contextmanager
    def timed(self, trigger: str):
        start = time.perf_counter()
        try:
            yield
        except Exception:
            self.errors.labels(trigger).inc()
            raise
        finally:
            self.reconciles.labels(trigger).observe(time.perf_counter() - start)

    def collect(self):
        """Called by prometheus_client at each scrape."""
        jobs = self.reconciler.phases()
        phases = GaugeMetricFamily("finetune_jobs", "FineTuneJobs and FineTuneSweeps by phase", labels=["kind", "phase"])
        for kind in KINDS:
            for phase in PHASES:
                phases.add_metric([kind, phase], sum(key[0] == kind and p == phase for key, p, _ in jobs))
        yield phases
        for metric, text, value_of in JOB_GAUGES:
            gauge = GaugeMetricFamily(metric, text, labels=["namespace", "name"])
            for (kind, ns, name), phase, progress in jobs:
                value = value_of(progress or Progress())
                if kind == JOB.name and phase == State.RUNNING and value is not None:
                    gauge.add_metric([ns, name], value)
            yield gauge

    def server(self, address: str, healthy) -> ThreadingHTTPServer:
        """/metrics and /healthz (200 while healthy() is true) on host:port; the caller serves it."""
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/metrics":
                    code, body, kind = 200, generate_latest(registry), CONTENT_TYPE_LATEST
                elif self.path == "/healthz":
                    ok = healthy()
                    code, body, kind = (200 if ok else 503), (b"ok" if ok else b"unhealthy"), "text/plain"
                else:
                    code, body, kind = 404, b"not found", "text/plain"
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes and probes are not worth a log line each
                pass

        host, _, port = address.rpartition(":")
        server = ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)
        server.daemon_threads = True
        return server

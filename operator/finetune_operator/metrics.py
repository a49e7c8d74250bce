"""Prometheus /metrics and /healthz. Jobs by phase and each running job's step, loss and
tokens/s are read from the reconciler's caches at scrape time; reconciles are counted and
timed as they happen."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from finetune_operator.reconcile import JOB, KINDS, Reconciler
from finetune_operator.status import PHASES

# Per running job, from its progress.json: metric name, help, progress.json key.
JOB_GAUGES = (
    ("finetune_job_step", "Training step the job reached", "step"),
    ("finetune_job_train_loss", "Latest training loss", "train_loss"),
    ("finetune_job_eval_loss", "Latest evaluation loss", "eval_loss"),
    ("finetune_job_tokens_per_second", "Training throughput in tokens per second", "tokens_per_s"),
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
        r = self.reconciler
        jobs = []  # (kind, namespace, name, phase, progress.json)
        for (kind, ns, name), body in list(r.jobs.items()):
            uid = body["metadata"]["uid"]
            status = r.written.get(uid) or body.get("status") or {}
            read = r.reads.get(uid)
            jobs.append((kind, ns, name, status.get("phase"), (read.progress if read else None) or {}))
        phases = GaugeMetricFamily("finetune_jobs", "FineTuneJobs and FineTuneSweeps by phase", labels=["kind", "phase"])
        for kind in KINDS:
            for phase in PHASES:
                phases.add_metric([kind, phase], sum(j[0] == kind and j[3] == phase for j in jobs))
        yield phases
        for metric, text, field in JOB_GAUGES:
            gauge = GaugeMetricFamily(metric, text, labels=["namespace", "name"])
            for kind, ns, name, phase, progress in jobs:
                value = progress.get(field, progress.get("metrics", {}).get(field))
                if kind == JOB.name and phase == "Running" and isinstance(value, int | float):
                    gauge.add_metric([ns, name], value)
            yield gauge

    def serve(self, address: str, healthy) -> ThreadingHTTPServer:
        """/metrics and /healthz (200 while healthy() is true) on host:port, in a daemon thread."""
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
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        return server

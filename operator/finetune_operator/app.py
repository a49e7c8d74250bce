"""`finetune operator`: kopf watches FineTuneJobs, FineTuneSweeps and the RayJobs we manage,
keeps them in its indexes and hands each event to the Reconciler. Runs push reports to
/v1/progress on the report port, each reconciled at once; every --poll-seconds one loop looks
at every object for what only looking finds (a run gone silent, a queue). /metrics and
/healthz are on the metrics port. A Lease makes one replica act; the others answer reports
with a redirect to it."""

from __future__ import annotations

import contextvars
import copy
import gc
import json
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import kopf
from kubernetes import client, config

from finetune_api.kinds import KINDS
from finetune_api.spec import GROUP, VERSION
from finetune_api.status import FINAL, State
from finetune_operator.builders import MANAGED_BY, Settings, controller
from finetune_operator.leader import LeaderElector
from finetune_operator.metrics import Metrics
from finetune_operator.reconcile import RAY_GROUP, RAY_VERSION, RAYJOBS, Apis, Cache, Reconciler, Rejected, cached, key_of, owner_key, pod_owner

log = logging.getLogger("finetune.operator")

REPORT_PATH = "/v1/progress"
# A final report (Succeeded, Failed, Preempted) is answered once the status has it: the run's
# last word, after which its driver exits and KubeRay decides on a retry.
FINAL_REPORT_WAIT_SECONDS = 10.0
MAX_WORKERS = 16  # kopf's threads for sync handlers: reconciles of different objects at once


@dataclass
class Options:
    namespaces: list[str] = field(default_factory=list)  # empty: every namespace
    settings: Settings = field(default_factory=Settings)
    poll_seconds: float = 10.0
    metrics_address: str = "0.0.0.0:8080"
    report_address: str = "0.0.0.0:8081"
    advertise_url: str | None = None  # how the other replicas reach this one's report port (redirects)
    leader_election: bool = True
    lease_name: str = "finetune-operator"
    lease_namespace: str | None = None
    identity: str | None = None
    log_format: str = "json"


def _snapshot(body) -> dict:
    """kopf's body view as a plain dict, safe to keep after the handler returns."""
    return copy.deepcopy(cached(dict(body)))


def _one(index, key):
    return next(iter(index.get(key, ())), None)


def _object(indexes, key) -> dict | None:
    """The FineTuneJob or FineTuneSweep of `key` as its kind's index holds it."""
    return _one(indexes[f"{KINDS[key[0]].plural}_index"], key)


class Indexed:
    """Reconciles that no watch event starts (a run's report, the periodic look), with what
    kopf's indexes hold. Not a kopf daemon or timer per object: kopf puts a finalizer on every
    object that has one, which costs a write and a watch event per job and leaves no
    FineTuneJob deletable while the operator is not running."""

    def __init__(self, reconciler: Reconciler, metrics: Metrics):
        self.reconciler, self.metrics = reconciler, metrics
        self.indexes: dict | None = None  # kopf's, from its startup on
        # kopf posts Events only from a handler's context (its event queue is a context
        # variable): a copy of the first handler's, for the reconciles started here.
        self.context: contextvars.Context | None = None

    def uid(self, key) -> str | None:
        body = _object(self.indexes, key) if self.indexes is not None else None
        return body["metadata"]["uid"] if body is not None else None

    def rayjob_owner(self, namespace: str, name: str) -> str | None:
        return _one(self.indexes["rayjob_owners"], (namespace, name)) if self.indexes is not None else None

    def reconcile(self, key, trigger: str, check: bool = False) -> dict | None:
        if self.indexes is None or self.context is None:
            return None  # kopf has handled no event yet: its first events reconcile every object
        with self.metrics.timed(trigger):
            return self.context.copy().run(_reconcile_indexed, self.reconciler, key, self.indexes, check)

    def poll(self, every: float, stop: threading.Event) -> None:
        """Every `every` seconds each object: a run gone silent, why Kueue lets a job wait."""
        while not stop.wait(every):
            for kind in KINDS.values():
                for key in list((self.indexes or {}).get(f"{kind.plural}_index", ())):
                    try:
                        self.reconcile(key, "poll", check=True)
                    except Exception:  # the next look tries again; one object must not stop the others
                        log.exception("reconciling %s %s/%s", *key)


def registry(reconciler: Reconciler, metrics: Metrics, indexed: Indexed) -> kopf.OperatorRegistry:
    """The handlers: indexes of our objects, RayJobs and Ray pods, watch events routed to
    the reconciler; the indexes handed to `indexed` at start."""
    reg = kopf.OperatorRegistry()

    @kopf.on.login(registry=reg)
    def login(**kwargs):  # the same credentials as our own client: kubeconfig or in-cluster
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=reg)
    def configure(settings: kopf.OperatorSettings, **kwargs):
        indexed.indexes = {name: kwargs[name] for name in ("rayjobs_index", "rayjob_owners", "pods_index",
                                                           *(f"{k.plural}_index" for k in KINDS.values()))}
        # No handler of ours needs a finalizer or keeps kopf state on the objects; kopf removes
        # this finalizer from objects that versions with a daemon per object marked.
        settings.persistence.finalizer = f"{GROUP}/kopf-finalizer"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
        # Events: ours, one per transition, through kopf's poster; of kopf's own log lines only warnings.
        settings.posting.level = logging.WARNING
        settings.execution.max_workers = MAX_WORKERS
        # The chart grants no list/watch on namespaces or CRDs: watch exactly the named namespaces
        # and the resources discovery found at start (else kopf retries 403s for about a minute).
        settings.scanning.disabled = True
        # Only the Ray pods of our jobs, filtered by the apiserver: not every pod of the cluster.
        settings.watching.label_selectors["", "v1", "pods"] = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())

    @kopf.index(RAY_GROUP, RAY_VERSION, RAYJOBS, labels=MANAGED_BY, id="rayjobs_index", registry=reg)
    def rayjobs_index(body, **_):
        key = owner_key(body)
        return {key: _snapshot(body)} if key is not None else None

    # Every RayJob's controller by name, ours or not: whether the name of a new job's RayJob is free.
    @kopf.index(RAY_GROUP, RAY_VERSION, RAYJOBS, id="rayjob_owners", registry=reg)
    def rayjob_owners(body, namespace, name, **_):
        return {(namespace, name): controller(body)}

    @kopf.on.event(RAY_GROUP, RAY_VERSION, RAYJOBS, labels=MANAGED_BY, registry=reg)
    def rayjob(type, body, **indexes):  # kopf has put the event in the indexes already (a deleted RayJob out of them)
        key = owner_key(body)
        if key is not None:
            if type == "DELETED":
                reconciler.rayjob_deleted(controller(body))
            with metrics.timed("rayjob"):
                _reconcile_indexed(reconciler, key, indexes)

    # The Ray pods (KubeRay copies our labels onto them): why a job's pods do not start.
    @kopf.index("", "v1", "pods", labels=MANAGED_BY, id="pods_index", registry=reg)
    def pods_index(body, **_):
        key = pod_owner(body)
        return {key: {"metadata": {"name": body["metadata"]["name"]}, "status": dict(body.get("status") or {})}} if key else None

    @kopf.on.event("", "v1", "pods", labels=MANAGED_BY, registry=reg)
    def pod(body, **indexes):
        key = pod_owner(body)
        if key is not None:
            with metrics.timed("pod"):
                _reconcile_indexed(reconciler, key, indexes)

    for kind in KINDS.values():
        _kind_handlers(reg, kind, reconciler, metrics, indexed)
    return reg


def _kind_handlers(reg: kopf.OperatorRegistry, kind, reconciler: Reconciler, metrics: Metrics, indexed: Indexed) -> None:
    plural = kind.plural

    @kopf.index(GROUP, VERSION, plural, id=f"{plural}_index", registry=reg)
    def index(body, **_):
        return {key_of(body): _snapshot(body)}

    @kopf.on.event(GROUP, VERSION, plural, id=plural, registry=reg)
    def event(type, body, uid, **indexes):
        if indexed.context is None:
            indexed.context = contextvars.copy_context()
        if type == "DELETED":
            reconciler.forget(uid)
            return
        with metrics.timed(kind.name.lower()):
            _reconcile_indexed(reconciler, key_of(body), indexes)


def _reconcile_indexed(reconciler: Reconciler, key, indexes, check: bool = False) -> dict | None:
    """Reconciles the object of `key` with what kopf's indexes hold: it, its RayJob and its Ray
    pods, read under the object's lock. Read before it, any of them could be older than what
    a concurrent reconcile (an event, a report, the poll) just acted on: an older spec applied
    again, a Succeeded job back to Running."""
    seen = _object(indexes, key)
    if seen is None:
        return None
    with reconciler.lock(seen["metadata"]["uid"]):
        body = _object(indexes, key)
        if body is None or body["metadata"]["uid"] != seen["metadata"]["uid"]:
            return None  # deleted, or deleted and made again: its own events reconcile the new one
        return reconciler.reconcile(body, _one(indexes["rayjobs_index"], key), list(indexes["pods_index"].get(key, ())), check)


def _api() -> client.ApiClient:
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    # A connection for every thread that calls the apiserver at once (kopf's handler threads, the
    # poll, report handlers): the default (5 per core) makes a burst open and drop a TLS
    # connection per request beyond it ("Connection pool is full, discarding connection").
    configuration.connection_pool_maxsize = MAX_WORKERS + 8
    return client.ApiClient(configuration)


class Reports(ThreadingHTTPServer):
    """POST /v1/progress: a run's report. The leader takes it; a replica that does not lead
    redirects to the one that does (or answers 503 while none is known)."""

    daemon_threads = True

    def __init__(self, address: str, reconciler: Reconciler, indexed: Indexed, leader_url):
        self.reconciler, self.indexed, self.leader_url = reconciler, indexed, leader_url  # leader_url(): None when this replica leads
        host, _, port = address.rpartition(":")
        super().__init__((host or "0.0.0.0", int(port)), _ReportHandler)


class _ReportHandler(BaseHTTPRequestHandler):
    server: Reports

    def do_POST(self):
        if self.path != REPORT_PATH:
            return self._answer(404, "not found")
        elsewhere = self.server.leader_url()
        if elsewhere is not None:
            return self._answer(307, "ask the leader", location=elsewhere) if elsewhere else self._answer(503, "no leader yet")
        token = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        try:
            doc = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
            report = self.server.reconciler.receive(token, doc)
        except Rejected as err:
            return self._answer(err.code, str(err))
        except ValueError as err:
            return self._answer(400, f"not JSON: {err}")
        except client.ApiException as err:  # the TokenReview or pod lookup failed: the run tries again
            return self._answer(503, f"cannot check the report now: {err.reason}")
        try:
            self.server.indexed.reconcile((doc["kind"], doc["namespace"], doc["name"]), "report")
        except Exception:  # the report is kept: the next event or poll reconciles it
            log.exception("reconciling the report of %s %s/%s", doc["kind"], doc["namespace"], doc["name"])
        if report.progress is not None and report.progress.state in (*FINAL, State.PREEMPTED):
            report.consumed.wait(FINAL_REPORT_WAIT_SECONDS)
        self._answer(200, "ok")

    def _answer(self, code: int, text: str, location: str | None = None):
        body = text.encode()
        self.send_response(code)
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # one line per report is noise; rejections are answered, not logged
        pass


def _serve(server: ThreadingHTTPServer, name: str) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    return thread


def run(opts: Options) -> int:
    """Runs until SIGTERM/SIGINT (exit 0), a lost Lease or kopf failing (exit 1)."""
    kopf.configure(log_format=kopf.LogFormat.JSON if opts.log_format == "json" else kopf.LogFormat.FULL)
    # kopf logs every handled watch event at INFO ("Handler ... succeeded"); ours log what changed.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    api = _api()
    stop, failed, leading = threading.Event(), threading.Event(), threading.Event()
    cache = Cache(lambda namespace, name: indexed.rayjob_owner(namespace, name), lambda key: indexed.uid(key))  # indexed: below
    reconciler = Reconciler(Apis.of(api), cache, opts.settings,
                            post_event=lambda body, type, reason, message: kopf.event(body, type=type, reason=reason, message=message))
    metrics = Metrics(reconciler)
    indexed = Indexed(reconciler, metrics)
    identity = opts.identity or os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    elector = None
    if opts.leader_election:
        namespace = opts.lease_namespace or os.environ.get("POD_NAMESPACE") or "default"
        elector = LeaderElector(client.CoordinationV1Api(api), opts.lease_name, namespace, identity, address=opts.advertise_url)

    def leader_url() -> str | None:
        """None when this replica takes reports; else the leader's report URL ('' if unknown)."""
        if leading.is_set():
            return None
        return (elector.leader_address() if elector else None) or ""

    servers = [metrics.server(opts.metrics_address, healthy=lambda: not stop.is_set()),
               Reports(opts.report_address, reconciler, indexed, leader_url)]
    for server, name in zip(servers, ("metrics", "reports")):
        _serve(server, name)
    # The main thread owns the signals; kopf, in its own thread, stops through the same flag.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threads = []
    if elector is not None:
        if not elector.acquire(stop):
            _shutdown(servers)
            return 0

        def lost():  # another replica may act from now on: stop at once (the Pod restarts as a follower)
            failed.set()
            stop.set()

        threads.append(threading.Thread(target=elector.keep, args=(stop, lost), name="lease"))
    leading.set()

    def operate():
        try:
            kopf.run(
                registry=registry(reconciler, metrics, indexed),
                standalone=True,  # kopf's peering only pauses replicas; the Lease decides who acts
                clusterwide=not opts.namespaces,
                namespaces=opts.namespaces,
                stop_flag=stop,
            )
        except BaseException:
            log.exception("kopf stopped")
            failed.set()
        finally:
            stop.set()

    # What is imported and built by now (modules, classes, pydantic's schemas: ~150,000 objects)
    # lives as long as the process: kept out of the garbage collector's full passes, which walked
    # it every time. While 1,000 jobs arrived those passes paused every thread for 100-300 ms,
    # most of the p99 of bench/operator_latency.py.
    gc.freeze()
    kopf_thread = threading.Thread(target=operate, name="kopf")
    threads += [kopf_thread, threading.Thread(target=indexed.poll, args=(opts.poll_seconds, stop), name="poll")]
    for thread in threads:
        thread.start()
    while kopf_thread.is_alive():
        kopf_thread.join(0.5)  # a short join, so signal handlers run promptly in this thread
    # Joined, not left as daemons: a thread still logging while the interpreter shuts down
    # aborts the process (CPython's fatal error on the stdout lock: exit -6).
    for thread in threads:
        thread.join()
    leading.clear()
    _shutdown(servers)
    if elector is not None and not failed.is_set():
        elector.release()
    return 1 if failed.is_set() else 0


def _shutdown(servers: list[ThreadingHTTPServer]) -> None:
    for server in servers:
        server.shutdown()
        server.server_close()

"""`finetune operator`: kopf watches FineTuneJobs, FineTuneSweeps and the RayJobs we manage and routes every
event to the Reconciler; a poll loop refreshes progress.json and retries what waits; a Lease
makes one replica act; /metrics and /healthz are served beside it."""

from __future__ import annotations

import copy
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass, field

import kopf
from kubernetes import client, config

from finetune_api.spec import GROUP, VERSION
from finetune_operator.builders import DEFAULT_IMAGE, MANAGED_BY
from finetune_operator.leader import LeaderElector
from finetune_operator.metrics import Metrics
from finetune_operator.reconcile import KINDS, RAY_GROUP, RAY_VERSION, RAYJOBS, Reconciler

log = logging.getLogger("finetune.operator")


@dataclass
class Options:
    namespaces: list[str] = field(default_factory=list)  # empty: every namespace
    image: str = DEFAULT_IMAGE
    poll_seconds: float = 10.0
    metrics_address: str = "0.0.0.0:8080"
    leader_election: bool = True
    lease_name: str = "finetune-operator"
    lease_namespace: str | None = None
    identity: str | None = None
    log_format: str = "json"


def registry(reconciler: Reconciler, metrics: Metrics) -> kopf.OperatorRegistry:
    """The handlers: each routes one watch event to the reconciler, nothing more."""
    reg = kopf.OperatorRegistry()

    @kopf.on.login(registry=reg)
    def login(**kwargs):  # the same credentials as our own client: kubeconfig or in-cluster
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=reg)
    def configure(settings: kopf.OperatorSettings, **_):
        # No handler of ours keeps kopf state on the objects; should one ever, it is ours.
        settings.persistence.finalizer = f"{GROUP}/kopf-finalizer"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
        settings.posting.enabled = False  # our Events come from the reconciler, one per transition
        settings.execution.max_workers = 16
        # The chart grants no list/watch on namespaces or CRDs: watch exactly the named namespaces
        # and the resources discovery found at start (else kopf retries 403s for about a minute).
        settings.scanning.disabled = True

    def route(trigger: str):
        def owner(type, body, **_):
            with metrics.timed(trigger):
                reconciler.job_event(type or "ADDED", _plain(body))

        return owner

    for kind in KINDS.values():
        kopf.on.event(GROUP, VERSION, kind.plural, id=kind.plural, registry=reg)(route(kind.name.lower()))

    @kopf.on.event(RAY_GROUP, RAY_VERSION, RAYJOBS, labels=MANAGED_BY, registry=reg)
    def rayjob(type, body, **_):
        with metrics.timed("rayjob"):
            reconciler.rayjob_event(type or "ADDED", _plain(body))

    return reg


def _plain(body) -> dict:
    """A snapshot of kopf's body view, safe to keep after the handler returns."""
    return copy.deepcopy(dict(body))


def _poll(reconciler: Reconciler, metrics: Metrics, every: float, stop: threading.Event) -> None:
    while not stop.wait(every):
        with metrics.timed("poll"):
            reconciler.poll()


def _api() -> client.ApiClient:
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        config.load_kube_config()
    return client.ApiClient()


def run(opts: Options) -> int:
    """Runs until SIGTERM/SIGINT (exit 0), a lost Lease or kopf failing (exit 1)."""
    kopf.configure(log_format=kopf.LogFormat.JSON if opts.log_format == "json" else kopf.LogFormat.FULL)
    # kopf logs every handled watch event at INFO ("Handler ... succeeded"); ours log what changed.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    api = _api()
    reconciler = Reconciler(api, image=opts.image)
    metrics = Metrics(reconciler)
    stop, failed = threading.Event(), threading.Event()
    metrics.serve(opts.metrics_address, healthy=lambda: not stop.is_set())
    # The main thread owns the signals; kopf, in its own thread, stops through the same flag.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    elector = None
    if opts.leader_election:
        identity = opts.identity or os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
        namespace = opts.lease_namespace or os.environ.get("POD_NAMESPACE") or "default"
        elector = LeaderElector(api, opts.lease_name, namespace, identity)
        if not elector.acquire(stop):
            return 0

        def lost():  # another replica may act from now on: stop at once (the Pod restarts as a follower)
            failed.set()
            stop.set()

        threading.Thread(target=elector.keep, args=(stop, lost), name="lease", daemon=True).start()

    def operate():
        try:
            kopf.run(
                registry=registry(reconciler, metrics),
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

    kopf_thread = threading.Thread(target=operate, name="kopf")
    kopf_thread.start()
    threading.Thread(target=_poll, args=(reconciler, metrics, opts.poll_seconds, stop), name="poll", daemon=True).start()
    while kopf_thread.is_alive():
        kopf_thread.join(0.5)  # a short join, so signal handlers run promptly in this thread
    if elector is not None and not failed.is_set():
        elector.release()
    return 1 if failed.is_set() else 0

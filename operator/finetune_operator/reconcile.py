"""The operator's one I/O layer, without kopf: kopf's handlers hand it the object and its
RayJob from their indexes, and it creates the RayJob and changes it by server-side apply (one
field manager), writes the status when it changed (server-side apply on the status
subresource) and posts an Event per transition. Runs push their progress
(finetune_train/progress.py); `receive` checks who sent it (TokenReview of the pod's projected
token) and keeps the latest per job.

The operator reads no Secret and no bucket: a missing Secret shows in the pods' status, and
storage trouble in the run's own reports."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, NamedTuple

from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from finetune_api.kinds import JOB, KINDS, SWEEP, Kind
from finetune_api.spec import GROUP, VERSION, FineTuneJobSpec, SpecError
from finetune_api.status import INVALID_INPUT, Problem, Progress, State
from finetune_operator.builders import REPORT_AUDIENCE, Settings, as_applier, build_rayjob, build_sweep_rayjob, controller, needs_apply
from finetune_operator.status import Observed, build_status, build_sweep_status, finished, invalid_status, pod_problem, queued

log = logging.getLogger("finetune.operator")

RAY_GROUP, RAY_VERSION, RAYJOBS = "ray.io", "v1", "rayjobs"
KUEUE_GROUP, KUEUE_VERSION, WORKLOADS = "kueue.x-k8s.io", "v1beta2", "workloads"
# On a Workload the operator deactivated for a user's suspend: only those it activates again.
HELD = "finetune.dev/suspended"
FIELD_MANAGER = "finetune-operator"
APPLY = "application/apply-patch+yaml"
JSON_PATCH = "application/json-patch+json"
# A run pings every 10 s (progress.HEARTBEAT_SECONDS); this long without a word, its head is lost.
STALE_SECONDS = 45.0
# How long a verified token (and the pod it is bound to) is trusted before it is checked again.
IDENTITY_SECONDS = 60.0
# How long the RayJob an apply returned stands in for the one our watch has not delivered yet.
APPLIED_SECONDS = 30.0


class Ops(NamedTuple):
    """What the operator does with each kind: the RayJob and the status it builds."""

    kind: Kind
    rayjob: Callable[..., dict]
    status: Callable[..., Any]
    job_spec: Callable[[Any], FineTuneJobSpec]  # the spec that holds resources, storage and the queue
    suspend: Callable[[Any], bool]


OPS = {
    JOB.name: Ops(JOB, build_rayjob, build_status, lambda job: job.spec, lambda job: job.spec.suspend),
    SWEEP.name: Ops(SWEEP, build_sweep_rayjob, build_sweep_status, lambda sweep: sweep.spec.template, lambda sweep: sweep.spec.suspend),
}

Key = tuple[str, str, str]  # (kind, namespace, name)


def key_of(body: dict) -> Key:
    return body["kind"], body["metadata"]["namespace"], body["metadata"]["name"]


def owner_key(rayjob: dict) -> Key | None:
    """The key of the FineTuneJob or FineTuneSweep that controls a RayJob."""
    owner = next((r for r in rayjob["metadata"].get("ownerReferences", []) if r.get("controller")), None)
    if owner is None or owner["kind"] not in KINDS:
        return None
    return owner["kind"], rayjob["metadata"]["namespace"], owner["name"]


def pod_owner(pod: dict) -> Key | None:
    """The key of the FineTuneJob or FineTuneSweep a Ray pod runs (the builders' pod label)."""
    labels = pod["metadata"].get("labels") or {}
    for kind in KINDS.values():
        if labels.get(kind.label):
            return kind.name, pod["metadata"]["namespace"], labels[kind.label]
    return None


@dataclass
class Report:
    progress: Progress | None  # the latest progress (a ping carries none)
    seen: float  # when the run last said anything (monotonic)
    cluster: str  # the Ray cluster of the pod that said it
    consumed: threading.Event = field(default_factory=threading.Event)  # a reconcile has used it


@dataclass(frozen=True)
class Identity:
    """What a verified token says about its sender: the pod it is bound to."""

    namespace: str
    pod: str
    labels: dict[str, str]
    expires: float


@dataclass(frozen=True)
class Inputs:
    """Everything a reconcile's result depends on, but the clock."""

    generation: int | None
    rayjob: dict | None
    pods: list[dict]
    report: Report | None
    queue: str | None

    def same(self, other: Inputs | None) -> bool:
        # A report is new when it is another object (each receive makes one); the rest by value.
        return other is not None and self.report is other.report and (self.generation, self.rayjob, list(self.pods), self.queue) == (
            other.generation, other.rayjob, list(other.pods), other.queue)


class Rejected(Exception):
    """A report the operator does not take: `code` is the HTTP status to answer."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class Apis(NamedTuple):
    """The Kubernetes API groups the reconciler calls (a recording stand-in in unit tests)."""

    custom: Any
    core: Any
    authn: Any

    @classmethod
    def of(cls, api: client.ApiClient) -> Apis:
        return cls(client.CustomObjectsApi(api), client.CoreV1Api(api), client.AuthenticationV1Api(api))


def namespace_terminating(err: ApiException) -> bool:
    """The apiserver refuses new objects in a namespace being deleted (403, not an RBAC refusal)."""
    return err.status == 403 and "NamespaceTerminating" in str(err.body)


class Cache(NamedTuple):
    """What the operator's watches hold, read instead of asking the apiserver (kopf's indexes;
    the recording client in unit tests)."""

    rayjob_owner: Callable[[str, str], str | None]  # (namespace, name): the RayJob's controller uid, ours or not ('' none; None: no RayJob)
    uid: Callable[[Key], str | None]  # the uid of the FineTuneJob or FineTuneSweep of that key (None: none seen)


class Reconciler:
    def __init__(self, apis: Apis, cache: Cache, settings: Settings = Settings(),
                 post_event: Callable[[dict, str, str, str], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.custom, self.core, self.authn = apis
        self.cache = cache
        self.settings, self.post_event, self.clock = settings, post_event or (lambda *_: None), clock
        self.reports: dict[str, Report] = {}  # uid -> the run's latest report
        self.written: dict[str, dict] = {}  # uid -> status last written (the watch may lag behind)
        self.keys: dict[str, Key] = {}  # uid -> (kind, namespace, name), for /metrics
        self.queues: dict[str, str | None] = {}  # uid -> Kueue's word on the queued job, at the last check
        self.held: dict[str, bool] = {}  # uid -> whether its Workload was last made inactive (or active again)
        self.identities: dict[str, Identity] = {}  # sha256 of a token -> what it was verified as
        self._locks: dict[str, threading.RLock] = {}  # uid -> one reconcile at a time
        self.inputs: dict[str, Inputs] = {}  # uid -> what the last reconcile saw
        self.applied: dict[str, tuple[dict, float]] = {}  # uid -> (its RayJob as our apply returned it, when)

    def forget(self, uid: str) -> None:
        """The object is gone (and out of kopf's index). Under its lock: a reconcile or report
        running meanwhile would put back what is dropped here, kept for good."""
        with self.lock(uid):
            for memo in (self.reports, self.written, self.keys, self.queues, self.held, self.inputs, self.applied):
                memo.pop(uid, None)
            self._locks.pop(uid, None)

    def rayjob_deleted(self, uid: str) -> None:
        """The object's RayJob is gone (our watch saw it deleted): no longer stood in for."""
        with self.lock(uid):
            self.applied.pop(uid, None)

    def lock(self, uid: str) -> threading.RLock:
        """One reconcile of an object at a time. Callers that read the RayJob from an index hold
        it while they read: read before, the RayJob could be older than the one a concurrent
        reconcile just acted on (a Succeeded job would go back to Running)."""
        return self._locks.setdefault(uid, threading.RLock())  # setdefault: atomic, so one lock per uid

    # ---- reconcile

    def reconcile(self, body: dict, rayjob: dict | None, pods: list[dict] = (), check: bool = False) -> dict | None:
        """Brings the RayJob to the spec and the status to what is known (the RayJob, its Ray
        pods, the run's reports); returns the status. `check` (the periodic pass): also ask
        Kueue why a queued job waits."""
        ops, uid = OPS[body["kind"]], body["metadata"]["uid"]
        with self.lock(uid):
            if rayjob is not None:
                self.applied.pop(uid, None)
            elif (applied := self.applied.get(uid)) is not None and self.clock() - applied[1] < APPLIED_SECONDS:
                # Our own write coming back (the status) can beat the watch of the RayJob we just
                # made: applying it again would cost a request, and undo Kueue's admission.
                rayjob = applied[0]
            previous = self.written.get(uid) or body.get("status")
            # The same inputs give the same status: most events (our own writes coming back, our
            # RayJob's echo) and most polls change nothing, and 1,000 jobs make many of them.
            inputs = Inputs(body["metadata"].get("generation"), rayjob, pods, self.reports.get(uid), self.queues.get(uid))
            if previous is not None and inputs.same(self.inputs.get(uid)) and not (check and _changes_with_time(rayjob)):
                return previous
            try:
                obj = ops.kind.parse(body)
            except SpecError as err:
                return self._write(body, previous, invalid_status(body["metadata"].get("generation"), "; ".join(err.errors), previous, time.time()))
            if rayjob is None and finished(previous) and previous.get("rayJobName"):
                return previous  # its RayJob was deleted after the end: a new one would train the job again
            report = inputs.report
            current = report if report is not None and rayjob is not None and report.cluster == _cluster(rayjob) else None
            if current is None and finished(previous) and _over(rayjob) and previous.get("observedGeneration") == obj.metadata.generation:
                # Nothing can change it, and the run's last word (its reason and message, an InvalidInput
                # that keeps KubeRay from retrying) is in that status only: reports live in memory, lost on a restart.
                self.inputs[uid] = inputs
                return previous
            progress = current.progress if current is not None else None
            give_up = progress is not None and progress.state == State.FAILED and progress.reason == INVALID_INPUT
            desired = ops.rayjob(obj, self.settings, observed=rayjob, give_up=give_up)
            queue = ops.job_spec(obj).queue_name
            hold = ops.suspend(obj) and queue is not None  # see _hold
            problem = None
            if needs_apply(desired, rayjob) and not (hold and rayjob is None):
                try:
                    rayjob, problem = self._apply(desired, rayjob, obj.metadata.uid, ops.kind)
                    if rayjob is not None:
                        self.applied[uid] = rayjob, self.clock()
                except ApiException as err:
                    if not namespace_terminating(err):
                        raise
                    return previous  # the job goes with its namespace: nothing to create or say
            # Held and yet unsuspended: Kueue admitted a Workload not deactivated (it replaces one that
            # still holds quota when the RayJob's pods change; or one was deleted by hand).
            if queue is not None and rayjob is not None and problem is None and (
                    self.held.get(uid) != hold or hold and not (rayjob.get("spec") or {}).get("suspend")):
                self._hold(uid, rayjob, hold)
            if check and problem is None:
                self.queues[uid] = self._queue_message(rayjob) if queued(ops.suspend(obj), queue, rayjob) else None
            problem = (problem or self._stale(rayjob, report) or (progress.warning if progress else None)
                       or (pod_problem(pods) if _starting(rayjob) else None))
            seen = Observed(rayjob=rayjob, progress=progress, problem=problem, queue=self.queues.get(uid))
            status = self._write(body, previous, ops.status(obj, seen, previous, time.time()))
            if current is not None:
                current.consumed.set()
            if rayjob is not None:  # else its name is taken, or it is held back: looked at again each time
                self.inputs[uid] = replace(inputs, rayjob=rayjob, queue=self.queues.get(uid))  # as applied, as Kueue said
            return status

    def _apply(self, desired: dict, observed: dict | None, uid: str, kind: Kind) -> tuple[dict | None, Problem | None]:
        """A new RayJob is created; a change to it is a server-side apply, after the fields the
        create wrote are made ours as an applier's. A RayJob of that name that is not the
        object's (no controller reference to it) is left alone and named in the status.
        Whether the name is free is asked of the watch, not the apiserver: a GET per new job
        cost the apply as long again at 1,000 jobs (bench/operator_latency.py); a RayJob made
        in the instant before ours would be taken over, as by any controller that acts on its
        cache."""
        ns, name = desired["metadata"]["namespace"], desired["metadata"]["name"]
        owner = controller(observed) if observed is not None else self.cache.rayjob_owner(ns, name)
        if owner not in (None, uid):
            return None, Problem(reason="RayJobNameTaken", message=f"metadata.name: RayJob {ns}/{name} exists and belongs to "
                                 f"something else; delete it or give the {kind.name} another name")
        args = RAY_GROUP, RAY_VERSION, ns, RAYJOBS
        if owner is None:
            try:  # a create costs the apiserver half an apply of the RayJob's schema (bench/operator_latency.py)
                created = self.custom.create_namespaced_custom_object(*args, desired, field_manager=FIELD_MANAGER)
                log.info("created RayJob %s/%s", ns, name)
                return cached(created), None
            except ApiException as err:
                if err.status != 409:
                    raise
                # Made since our watch last looked (the race any cache has): applied as before.
        else:
            self._fold(args, name)
        applied = _apply(self.custom.patch_namespaced_custom_object, *args, name, desired)
        log.info("applied RayJob %s/%s", ns, name)
        return applied, None

    def _fold(self, args: tuple, name: str) -> None:
        """The fields our create wrote made ours as an applier's (builders.as_applier), read
        from the RayJob as it is: what the watch holds has no managedFields (cached)."""
        for attempt in range(2):
            patch = as_applier(self.custom.get_namespaced_custom_object(*args, name)["metadata"].get("managedFields") or [], FIELD_MANAGER)
            if not patch:
                return
            try:
                self.custom.patch_namespaced_custom_object(*args, name, patch, field_manager=FIELD_MANAGER, _content_type=JSON_PATCH)
                return
            except ApiException as err:  # 422: a write since our read moved the entries (its test ops failed): read again
                if err.status != 422 or attempt:
                    raise

    def _workloads(self, rayjob: dict) -> list[dict]:
        """Kueue's Workloads of the RayJob (none when it cannot be read: Kueue may not be installed)."""
        try:
            return self.custom.list_namespaced_custom_object(
                KUEUE_GROUP, KUEUE_VERSION, rayjob["metadata"]["namespace"], WORKLOADS,
                label_selector=f"kueue.x-k8s.io/job-uid={rayjob['metadata']['uid']}")["items"]
        except ApiException as err:
            log.warning("could not read Kueue's Workload of RayJob %s: %s", rayjob["metadata"]["name"], err.reason)
            return []

    def _hold(self, uid: str, rayjob: dict, hold: bool) -> None:
        """A queued job the user suspends gets its Workload deactivated, and activated again when
        they resume it. Kueue unsuspends any RayJob it has admitted, and admits a suspended one
        when quota frees, so suspend alone would not stop a queued job; deactivating is how
        Kueue stops one, and gives its quota to the jobs that wait. (A queued job created
        suspended gets no RayJob until it is resumed: Kueue never sees it.)"""
        workloads = self._workloads(rayjob)
        for w in workloads:
            ns, name = w["metadata"]["namespace"], w["metadata"]["name"]
            # Only an active one is held, and only one held by us let go: Kueue deactivates for reasons of its own.
            if (w["spec"].get("active", True) if hold else HELD in (w["metadata"].get("annotations") or {})):
                try:
                    self.custom.patch_namespaced_custom_object(
                        KUEUE_GROUP, KUEUE_VERSION, ns, WORKLOADS, name,
                        {"metadata": {"annotations": {HELD: "true" if hold else None}}, "spec": {"active": not hold}},
                        _content_type="application/merge-patch+json")
                except ApiException as err:  # the status is still written; the next reconcile tries again
                    log.warning("could not %s Kueue Workload %s/%s: %s", "deactivate" if hold else "activate", ns, name, err.reason)
                    return
                log.info("%s Kueue Workload %s/%s", "deactivated" if hold else "activated", ns, name)
        if workloads or not hold:  # Kueue makes the Workload after the RayJob: until then, looked for again
            self.held[uid] = hold

    def _queue_message(self, rayjob: dict) -> str | None:
        """Kueue's reason for not admitting the RayJob yet (its Workload's QuotaReserved condition)."""
        for workload in self._workloads(rayjob):
            for cond in (workload.get("status") or {}).get("conditions") or []:
                if cond.get("type") == "QuotaReserved" and cond.get("status") == "False":
                    return cond.get("message")
        return None

    def _stale(self, rayjob: dict | None, report: Report | None) -> Problem | None:
        """A running job whose run went silent after it had reported: its head is lost."""
        if rayjob is None or (rayjob.get("status") or {}).get("jobDeploymentStatus") != "Running":
            return None
        if report is None or report.cluster != _cluster(rayjob) or self.clock() - report.seen < STALE_SECONDS:
            return None
        return Problem(reason="ReportsStopped", message=f"no report from the run for {self.clock() - report.seen:.0f} s: the Ray head "
                       f"may be lost (kubectl get pods -l ray.io/cluster={report.cluster})")

    # ---- writes

    def _write(self, body: dict, previous: dict | None, status) -> dict:
        """The status, when it differs from the last one written; an Event per transition."""
        status = status.wire()
        previous = previous or {}
        if status == previous:
            return status
        kind, ns, name = key_of(body)
        _apply(self.custom.patch_namespaced_custom_object_status, GROUP, VERSION, ns, KINDS[kind].plural, name,
               {"apiVersion": body["apiVersion"], "kind": kind, "metadata": {"name": name, "namespace": ns}, "status": status})
        self.written[body["metadata"]["uid"]], self.keys[body["metadata"]["uid"]] = status, (kind, ns, name)
        if (status["phase"], status["reason"]) != (previous.get("phase"), previous.get("reason")):
            warning = status["phase"] == State.FAILED or _ready(status) == "False"
            self.post_event(body, "Warning" if warning else "Normal", status["reason"], status["message"][:1024])
        elif _ready(status) != _ready(previous) and _ready(status) == "False":
            ready = next(c for c in status["conditions"] if c["type"] == "Ready")
            self.post_event(body, "Warning", ready["reason"], ready["message"][:1024])
        return status

    # ---- reports

    def receive(self, token: str, doc: Any) -> Report:
        """A run's report: who sent it is checked (the token, the pod it is bound to, the pod's
        job) and the latest is kept. Rejected names what is wrong."""
        try:
            kind, ns, name, uid = doc["kind"], doc["namespace"], doc["name"], doc["uid"]
            progress = Progress.model_validate(doc["progress"]) if "progress" in doc else None
        except (KeyError, TypeError, ValidationError) as err:
            raise Rejected(400, f"not a progress report: {err}") from None
        if kind not in KINDS:
            raise Rejected(400, f"kind: must be one of {', '.join(KINDS)}")
        who = self._identity(token)
        if who.namespace != ns or who.labels.get(KINDS[kind].label) != name:
            raise Rejected(403, f"pod {who.namespace}/{who.pod} does not run {kind} {ns}/{name}")

        def check_uid():  # reports are kept by uid: only the named object's own
            if self.cache.uid((kind, ns, name)) != uid:
                raise Rejected(403, f"uid {uid} is not that of {kind} {ns}/{name} (deleted and made again?)")

        check_uid()  # before a lock is made for it
        with self.lock(uid):
            check_uid()  # and again: deleted (forgotten) while this waited for the lock
            last = self.reports.get(uid)
            keep = progress is None or (last is not None and last.progress is not None and last.progress.updated > progress.updated)
            # A report replaced before a reconcile used it is used with its successor: one whose
            # sender waits for that (a final report) would otherwise wait its whole timeout.
            waiting = last.consumed if last is not None and not last.consumed.is_set() else threading.Event()
            report = Report(last.progress if keep and last is not None else progress, self.clock(), who.labels.get("ray.io/cluster", ""), waiting)
            self.reports[uid] = report
        return report

    def _identity(self, token: str) -> Identity:
        """The pod a projected token of our audience is bound to, by TokenReview, cached briefly."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        known = self.identities.get(digest)
        if known is not None and known.expires > self.clock():
            return known
        review = self.authn.create_token_review(client.V1TokenReview(
            spec=client.V1TokenReviewSpec(token=token, audiences=[REPORT_AUDIENCE])))
        st = review.status
        if not st.authenticated or REPORT_AUDIENCE not in (st.audiences or []):
            raise Rejected(401, f"token not accepted: {st.error or 'unauthenticated'}")
        username, extra = st.user.username or "", st.user.extra or {}
        pod, pod_uid = (extra.get(f"authentication.kubernetes.io/{k}", [None])[0] for k in ("pod-name", "pod-uid"))
        if not username.startswith("system:serviceaccount:") or not pod:
            raise Rejected(403, "the token is not bound to a pod")
        namespace = username.split(":")[2]
        try:
            found = self.core.read_namespaced_pod(pod, namespace)
        except ApiException as err:
            raise Rejected(403 if err.status == 404 else 503, f"pod {namespace}/{pod}: {err.reason}") from None
        if found.metadata.uid != pod_uid:
            raise Rejected(403, f"pod {namespace}/{pod} was replaced")
        if len(self.identities) > 10_000:  # tokens rotate: drop the expired
            now = self.clock()
            self.identities = {d: i for d, i in self.identities.items() if i.expires > now}
        who = self.identities[digest] = Identity(namespace, pod, dict(found.metadata.labels or {}), self.clock() + IDENTITY_SECONDS)
        return who

    def phases(self) -> list[tuple[Key, str | None, Progress | None]]:
        """(key, phase, latest progress) of every object whose status this replica wrote: what
        /metrics shows."""
        out = []
        for uid, key in list(self.keys.items()):
            report = self.reports.get(uid)
            out.append((key, (self.written.get(uid) or {}).get("phase"), report.progress if report else None))
        return out


def cached(obj: dict) -> dict:
    """What the operator keeps of an object it watches or writes: all but managedFields. Nothing
    reads them there, and they are over half of an object's dicts, which Python's garbage
    collector walks: with 1,000 jobs its full passes paused the operator 100-300 ms at a time
    (bench/operator_latency.py)."""
    return {**obj, "metadata": {k: v for k, v in obj["metadata"].items() if k != "managedFields"}}


def _apply(patch, *args) -> dict:
    """Server-side apply as our field manager, taking over fields others wrote. The body is read
    from the raw response: the client maps only 200 to an object, and an apply that creates
    answers 201."""
    return cached(json.loads(patch(*args, field_manager=FIELD_MANAGER, force=True, _content_type=APPLY, _preload_content=False).data))


def _cluster(rayjob: dict) -> str:
    return (rayjob.get("status") or {}).get("rayClusterName", "")


def _changes_with_time(rayjob: dict | None) -> bool:
    """Whether a periodic look can find news while nothing else changed: a running job's run
    may have gone silent; a suspended one may wait on Kueue."""
    return rayjob is not None and (bool((rayjob.get("spec") or {}).get("suspend"))
                                   or (rayjob.get("status") or {}).get("jobDeploymentStatus") == "Running")


def _over(rayjob: dict | None) -> bool:
    """KubeRay is done with the RayJob: it runs nothing more unless the RayJob is made again."""
    return rayjob is not None and (rayjob.get("status") or {}).get("jobDeploymentStatus") in ("Complete", "Failed", "ValidationFailed")


def _starting(rayjob: dict | None) -> bool:
    """KubeRay is still bringing the Ray cluster up (or up again, for a retry)."""
    return rayjob is not None and (rayjob.get("status") or {}).get("jobDeploymentStatus", "") in ("", "Initializing", "Retrying")


def _ready(status: dict) -> str | None:
    return next((c["status"] for c in status.get("conditions", []) if c["type"] == "Ready"), None)

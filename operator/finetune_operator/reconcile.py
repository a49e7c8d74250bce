"""The operator's one I/O layer. It keeps what the watches delivered (FineTuneJobs,
FineTuneSweeps and their RayJobs, like an informer cache), reads what the pure builders need (the storage Secret,
progress.json) and writes what they return: the RayJob, the status (only when it changed) and
an Event per transition. kopf handlers and the poll loop call `reconcile`; nothing here
imports kopf."""

from __future__ import annotations

import base64
import dataclasses
import logging
import threading
import time
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any, Callable, NamedTuple

from kubernetes import client
from kubernetes.client.rest import ApiException

from finetune_api import crd
from finetune_api.spec import API_VERSION, GROUP, VERSION, FineTuneJobSpec, SpecError, parse_job
from finetune_api.sweep import parse_sweep
from finetune_operator.builders import DEFAULT_IMAGE, build_rayjob, build_sweep_rayjob, owned_by, spec_patch
from finetune_operator.status import Problem, build_status, build_sweep_status, invalid_status
from finetune_train.storage import RunPaths, Store, StorageError, is_s3, normalize

log = logging.getLogger("finetune.operator")

RAY_GROUP, RAY_VERSION, RAYJOBS = "ray.io", "v1", "rayjobs"
FINAL = ("Succeeded", "Failed")
# The operator reads one small file per job and poll: fail fast rather than hold a worker
# thread through the training program's long storage retries.
READ_TIMEOUT_SECONDS, READ_ATTEMPTS = 5, 2


class Kind(NamedTuple):
    """What differs between the kinds the operator runs: parsing, the RayJob, the status."""

    name: str
    plural: str
    parse: Callable[[dict], Any]
    rayjob: Callable[[Any, str], dict]
    status: Callable[..., dict]
    job_spec: Callable[[Any], FineTuneJobSpec]  # the spec that holds storage and resources


JOB = Kind(crd.JOB.name, crd.JOB.plural, parse_job, build_rayjob, build_status, lambda job: job.spec)
SWEEP = Kind(crd.SWEEP.name, crd.SWEEP.plural, parse_sweep, build_sweep_rayjob, build_sweep_status, lambda sweep: sweep.spec.template)
KINDS = {k.name: k for k in (JOB, SWEEP)}

Key = tuple[str, str, str]  # (kind, namespace, name)


class Read(NamedTuple):
    """What the latest read of a job's storage found: progress.json, or why it could not be read."""

    progress: dict | None = None
    problem: Problem | None = None


def _key(obj: dict) -> Key:
    return obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]


class Reconciler:
    def __init__(self, api: client.ApiClient, image: str = DEFAULT_IMAGE, component: str = "finetune-operator"):
        self.custom, self.core = client.CustomObjectsApi(api), client.CoreV1Api(api)
        self.image, self.component = image, component
        self.jobs: dict[Key, dict] = {}  # latest FineTuneJob and FineTuneSweep bodies the watches delivered
        self.rayjobs: dict[Key, dict] = {}  # latest RayJobs we manage, by their owner's key
        self.reads: dict[str, Read] = {}  # uid -> latest read of the job's storage
        self.written: dict[str, dict] = {}  # uid -> latest status written (the watch may lag behind)
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)

    # ---- what the watches deliver

    def job_event(self, kind: str, body: dict) -> None:
        key, uid = _key(body), body["metadata"]["uid"]
        if kind == "DELETED":
            self.jobs.pop(key, None)
            for cache in (self.reads, self.written, self._locks):
                cache.pop(uid, None)
            return
        self.jobs[key] = body
        self.reconcile(key)

    def rayjob_event(self, kind: str, body: dict) -> None:
        owner = next((r for r in body["metadata"].get("ownerReferences", []) if r.get("controller")), None)
        if owner is None or owner["kind"] not in KINDS:
            return
        key = (owner["kind"], body["metadata"]["namespace"], owner["name"])
        if kind == "DELETED":
            self.rayjobs.pop(key, None)
        else:
            self.rayjobs[key] = body
        if key in self.jobs:
            self.reconcile(key)

    def poll(self) -> None:
        """Every job once: retries what failed (a missing Secret, unreachable storage) and
        refreshes progress.json."""
        for key in list(self.jobs):
            try:
                self.reconcile(key, read_progress=True)
            except Exception:  # one job's trouble never stops the others' polling
                log.exception("reconciling %s %s/%s failed", *key)

    # ---- reconcile

    def reconcile(self, key: Key, read_progress: bool = False) -> None:
        body = self.jobs.get(key)
        if body is None:
            return
        uid = body["metadata"]["uid"]
        with self._locks[uid]:
            body = self.jobs.get(key, body)  # the newest, if an event came while we waited
            previous = self.written.get(uid) or body.get("status")
            kind = KINDS[key[0]]
            try:
                job = kind.parse(body)
            except SpecError as err:
                message = "; ".join(err.errors)
                self._write(kind, body, previous, invalid_status(body["metadata"].get("generation"), message, previous, time.time()))
                return
            rayjob, last = self.rayjobs.get(key), self.reads.get(uid, Read())
            if rayjob is None and (previous or {}).get("phase") in FINAL and previous.get("rayJobName"):
                return  # its RayJob was deleted after the end: a new one would train the job again
            if rayjob is None:
                _, problem = self._credentials(job, kind)  # pods without their Secret would never start: wait for it
                if problem is None:
                    rayjob, problem = self._apply_rayjob(key, job, kind, None)
            else:
                rayjob, problem = self._apply_rayjob(key, job, kind, rayjob)
                if problem is None and read_progress and self._progress_may_change(kind.job_spec(job), rayjob, last):
                    last = self.reads[uid] = self._read_progress(job, kind, last)
                problem = problem or last.problem
            status = kind.status(job, rayjob, last.progress, previous, time.time(), problem)
            self._write(kind, body, previous, status)

    def _credentials(self, job, kind: Kind) -> tuple[dict | None, Problem | None]:
        """boto3 credentials from the job's Secret, or the Problem that stops reading them."""
        ref, ns = kind.job_spec(job).storage.credentials_secret, job.metadata.namespace
        if ref is None:
            return None, None
        field = "spec.template.storage.credentialsSecret" if kind is SWEEP else "spec.storage.credentialsSecret"
        try:
            data = self.core.read_namespaced_secret(ref.name, ns).data or {}
        except ApiException as err:
            if err.status == 404:
                return None, Problem("SecretNotFound", f"{field}.name: Secret {ns}/{ref.name} does not exist; create it with "
                                     f"keys {ref.access_key_id_key} and {ref.secret_access_key_key}")
            if err.status == 403:
                return None, Problem("SecretForbidden", f"{field}.name: the operator may not read Secret {ns}/{ref.name}; "
                                     "grant it get on secrets in this namespace")
            raise
        keys = {"aws_access_key_id": ref.access_key_id_key, "aws_secret_access_key": ref.secret_access_key_key}
        if ref.session_token_key:
            keys["aws_session_token"] = ref.session_token_key
        missing = [k for k in keys.values() if k not in data]
        if missing:
            return None, Problem("SecretKeyMissing", f"{field}: Secret {ns}/{ref.name} has no key {', '.join(missing)}; "
                                 "add it, or name the keys it has")
        return {arg: base64.b64decode(data[k]).decode() for arg, k in keys.items()}, None

    def _apply_rayjob(self, key: Key, job, kind: Kind, observed: dict | None) -> tuple[dict, Problem | None]:
        """Create-or-adopt: the RayJob's name derives from the job's, so however often this runs
        (an operator killed mid-create, two events at once) the apiserver keeps exactly one."""
        desired = kind.rayjob(job, self.image)
        ns, name = job.metadata.namespace, desired["metadata"]["name"]
        if observed is None:
            try:
                observed = self.custom.create_namespaced_custom_object(RAY_GROUP, RAY_VERSION, ns, RAYJOBS, desired)
                log.info("created RayJob %s/%s", ns, name)
            except ApiException as err:
                if err.status != 409:
                    raise
                observed = self.custom.get_namespaced_custom_object(RAY_GROUP, RAY_VERSION, ns, RAYJOBS, name)
        if not owned_by(observed, job.metadata.uid):
            return observed, Problem("RayJobNameTaken", f"metadata.name: RayJob {ns}/{name} exists and belongs to something "
                                     f"else; delete it or give the {kind.name} another name")
        patch, changed = spec_patch(desired, observed)
        if patch is not None:
            observed = self.custom.patch_namespaced_custom_object(RAY_GROUP, RAY_VERSION, ns, RAYJOBS, name, patch)
            log.info("updated RayJob %s/%s: %s", ns, name, ", ".join(changed))
        self.rayjobs[key] = observed
        return observed, None

    @staticmethod
    def _progress_may_change(spec: FineTuneJobSpec, rayjob: dict, last: Read) -> bool:
        # A local path is the pods' own disk, nothing the operator can read; a finished run's
        # final progress.json never changes.
        finished = rayjob.get("status", {}).get("jobDeploymentStatus") in ("Complete", "Failed")
        return is_s3(spec.storage.uri) and not (finished and (last.progress or {}).get("state") in FINAL)

    def _read_progress(self, job, kind: Kind, last: Read) -> Read:
        credentials, problem = self._credentials(job, kind)
        if problem is not None:
            return Read(last.progress, problem)
        storage = kind.job_spec(job).storage
        # Short timeouts, few attempts: see READ_TIMEOUT_SECONDS.
        store = dataclasses.replace(Store.of(storage, credentials), timeout_seconds=READ_TIMEOUT_SECONDS, max_attempts=READ_ATTEMPTS)
        paths = RunPaths(normalize(storage.uri), job.run_name, store)
        try:
            return Read(store.read_json(paths.progress) or last.progress)
        except StorageError as err:
            return Read(last.progress, Problem("StorageUnreachable", f"spec.storage.uri: cannot read the job's progress: {err}"))

    # ---- writes

    def _write(self, kind: Kind, body: dict, previous: dict | None, status: dict) -> None:
        """The status, when it differs from the last one written; an Event per transition."""
        previous = previous or {}
        if status == previous:
            return
        _, ns, name = _key(body)
        # A merge patch keeps keys it does not name: remove the ones the new status lacks.
        patch = {"status": {**{k: None for k in previous if k not in status}, **status}}
        self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, kind.plural, name, patch)
        self.written[body["metadata"]["uid"]] = status
        if (status["phase"], status["reason"]) != (previous.get("phase"), previous.get("reason")):
            warning = status["phase"] == "Failed" or _ready(status) == "False"
            self.event(body, "Warning" if warning else "Normal", status["reason"], status["message"])
        elif _ready(status) != _ready(previous) and _ready(status) == "False":
            ready = next(c for c in status["conditions"] if c["type"] == "Ready")
            self.event(body, "Warning", ready["reason"], ready["message"])

    def event(self, body: dict, kind: str, reason: str, message: str) -> None:
        meta = body["metadata"]
        now = datetime.now(timezone.utc)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"]),
            involved_object=client.V1ObjectReference(
                api_version=API_VERSION, kind=body["kind"], name=meta["name"], namespace=meta["namespace"], uid=meta["uid"],
                resource_version=meta.get("resourceVersion"),
            ),
            type=kind, reason=reason, message=message[:1024], count=1, first_timestamp=now, last_timestamp=now,
            source=client.V1EventSource(component=self.component), reporting_component=self.component,
        )
        try:
            self.core.create_namespaced_event(meta["namespace"], event)
        except ApiException as err:  # an Event is a courtesy: never fail a reconcile over one
            log.warning("could not post Event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], err.reason)


def _ready(status: dict) -> str | None:
    return next((c["status"] for c in status.get("conditions", []) if c["type"] == "Ready"), None)

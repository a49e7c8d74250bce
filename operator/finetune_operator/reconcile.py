"""The operator's one I/O layer. It keeps what the watches delivered (FineTuneJobs and their
RayJobs, like an informer cache), reads what the pure builders need (the storage Secret,
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
from typing import NamedTuple

from kubernetes import client
from kubernetes.client.rest import ApiException

from finetune_api.spec import API_VERSION, GROUP, KIND, VERSION, FineTuneJob, SpecError, parse_job
from finetune_api.crd import PLURAL
from finetune_operator.builders import DEFAULT_IMAGE, build_rayjob, owned_by, spec_patch
from finetune_operator.status import Problem, build_status, invalid_status
from finetune_train.storage import StorageError, is_s3, paths_for

log = logging.getLogger("finetune.operator")

RAY_GROUP, RAY_VERSION, RAYJOBS = "ray.io", "v1", "rayjobs"
FINAL = ("Succeeded", "Failed")
# The operator reads one small file per job and poll: fail fast rather than hold a worker
# thread through the training program's long storage retries.
READ_TIMEOUT_SECONDS, READ_ATTEMPTS = 5, 2


class Read(NamedTuple):
    """What the latest read of a job's storage found: progress.json, or why it could not be read."""

    progress: dict | None = None
    problem: Problem | None = None


def _key(obj: dict) -> tuple[str, str]:
    return obj["metadata"]["namespace"], obj["metadata"]["name"]


class Reconciler:
    def __init__(self, api: client.ApiClient, image: str = DEFAULT_IMAGE, component: str = "finetune-operator"):
        self.custom, self.core = client.CustomObjectsApi(api), client.CoreV1Api(api)
        self.image, self.component = image, component
        self.jobs: dict[tuple[str, str], dict] = {}  # latest FineTuneJob bodies the watch delivered
        self.rayjobs: dict[tuple[str, str], dict] = {}  # latest RayJobs we manage, by owner key
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

    def rayjob_event(self, kind: str, body: dict, owner: str) -> None:
        key = (body["metadata"]["namespace"], owner)
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
                log.exception("reconciling %s/%s failed", *key)

    # ---- reconcile

    def reconcile(self, key: tuple[str, str], read_progress: bool = False) -> None:
        body = self.jobs.get(key)
        if body is None:
            return
        uid = body["metadata"]["uid"]
        with self._locks[uid]:
            body = self.jobs.get(key, body)  # the newest, if an event came while we waited
            previous = self.written.get(uid) or body.get("status")
            try:
                job = parse_job(body)
            except SpecError as err:
                message = "; ".join(err.errors)
                self._write(body, previous, invalid_status(body["metadata"].get("generation"), message, previous, time.time()))
                return
            rayjob, last = self.rayjobs.get(key), self.reads.get(uid, Read())
            if rayjob is None and (previous or {}).get("phase") in FINAL and previous.get("rayJobName"):
                return  # its RayJob was deleted after the end: a new one would train the job again
            if rayjob is None:
                _, problem = self._credentials(job)  # pods without their Secret would never start: wait for it
                if problem is None:
                    rayjob, problem = self._apply_rayjob(job, None)
            else:
                rayjob, problem = self._apply_rayjob(job, rayjob)
                if problem is None and read_progress and self._progress_may_change(job, rayjob, last):
                    last = self.reads[uid] = self._read_progress(job, last)
                problem = problem or last.problem
            status = build_status(job, rayjob, last.progress, previous, time.time(), problem)
            self._write(body, previous, status)

    def _credentials(self, job: FineTuneJob) -> tuple[dict | None, Problem | None]:
        """boto3 credentials from the job's Secret, or the Problem that stops reading them."""
        ref, ns = job.spec.storage.credentials_secret, job.metadata.namespace
        if ref is None:
            return None, None
        field = "spec.storage.credentialsSecret"
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

    def _apply_rayjob(self, job: FineTuneJob, observed: dict | None) -> tuple[dict, Problem | None]:
        """Create-or-adopt: the RayJob's name is the job's, so however often this runs (an
        operator killed mid-create, two events at once) the apiserver keeps exactly one."""
        desired = build_rayjob(job, self.image)
        ns, name = job.metadata.namespace, job.name
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
                                     "else; delete it or give the FineTuneJob another name")
        patch, changed = spec_patch(desired, observed)
        if patch is not None:
            observed = self.custom.patch_namespaced_custom_object(RAY_GROUP, RAY_VERSION, ns, RAYJOBS, name, patch)
            log.info("updated RayJob %s/%s: %s", ns, name, ", ".join(changed))
        self.rayjobs[(ns, name)] = observed
        return observed, None

    @staticmethod
    def _progress_may_change(job: FineTuneJob, rayjob: dict, last: Read) -> bool:
        # A local path is the pods' own disk, nothing the operator can read; a finished run's
        # final progress.json never changes.
        finished = rayjob.get("status", {}).get("jobDeploymentStatus") in ("Complete", "Failed")
        return is_s3(job.spec.storage.uri) and not (finished and (last.progress or {}).get("state") in FINAL)

    def _read_progress(self, job: FineTuneJob, last: Read) -> Read:
        credentials, problem = self._credentials(job)
        if problem is not None:
            return Read(last.progress, problem)
        paths = paths_for(job, credentials=credentials)
        store = dataclasses.replace(paths.store, timeout_seconds=READ_TIMEOUT_SECONDS, max_attempts=READ_ATTEMPTS)
        try:
            return Read(store.read_json(paths.progress) or last.progress)
        except StorageError as err:
            return Read(last.progress, Problem("StorageUnreachable", f"spec.storage.uri: cannot read the job's progress: {err}"))

    # ---- writes

    def _write(self, body: dict, previous: dict | None, status: dict) -> None:
        """The status, when it differs from the last one written; an Event per transition."""
        previous = previous or {}
        if status == previous:
            return
        ns, name = _key(body)
        # A merge patch keeps keys it does not name: remove the ones the new status lacks.
        patch = {"status": {**{k: None for k in previous if k not in status}, **status}}
        self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, name, patch)
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
                api_version=API_VERSION, kind=KIND, name=meta["name"], namespace=meta["namespace"], uid=meta["uid"],
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

"""The Reconciler and the Lease against a recording client, in the unit tier (KubeRay's
controller unit tests do the same with a fake client): what is applied, written and posted for
each thing observed. The real-control-plane tier (test_operator.py) runs the same behaviour
through kopf and a real apiserver."""

from __future__ import annotations

import copy
import functools
import json
import threading
import time
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from conftest import TINY_LLAMA, job_doc
from finetune_operator.builders import SPEC_HASH, Settings, controller
from finetune_operator.leader import ADDRESS, LeaderElector
from finetune_operator.reconcile import FIELD_MANAGER, JSON_PATCH, STALE_SECONDS, Apis, Cache, Reconciler, Rejected, cached

pytestmark = pytest.mark.unit

UID = "6c1e0b8a-3d0f-4c52-9d7e-2b8f7f0f1a11"
TOKEN = "projected-token-of-the-head"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recording:
    """Stands in for CustomObjectsApi, CoreV1Api and AuthenticationV1Api: keeps the objects
    the reconciler applies and the statuses it writes, serves pods and token reviews."""

    def __init__(self):
        self.rayjobs: dict[tuple[str, str], dict] = {}
        self.calls: list[tuple] = []
        self.statuses: list[dict] = []
        self.pods: dict[tuple[str, str], client.V1Pod] = {}
        self.tokens: dict[str, tuple[str, str, str]] = {}  # token -> (namespace, pod, pod uid)
        self.workloads: list[dict] = []
        self.refusals = 0  # Workload patches to refuse (403), as RBAC without patch would
        self.reads: list[dict] = []  # what GETs answer before the RayJob as it is (a read older than a write)
        self.uids = {("FineTuneJob", "team-a", "sft"): UID, ("FineTuneJob", "team-a", "other"): "uid-of-other"}

    # Cache: what the operator's indexes hold
    def rayjob_owner(self, ns, name):
        return controller(self.rayjobs[ns, name]) if (ns, name) in self.rayjobs else None

    def uid(self, key):
        return self.uids.get(key)

    # CustomObjectsApi
    def patch_namespaced_custom_object(self, group, version, ns, plural, name, body, field_manager=None, force=None,
                                       _content_type=None, _preload_content=True):
        if plural == "workloads":  # a merge patch of Kueue's Workload
            self.calls.append(("patch", plural, name, body))
            if self.refusals:
                self.refusals -= 1
                raise ApiException(status=403, reason="Forbidden")
            workload = next(w for w in self.workloads if w["metadata"]["name"] == name)
            annotations = {**workload["metadata"].get("annotations", {}), **body["metadata"]["annotations"]}
            workload["metadata"]["annotations"] = {k: v for k, v in annotations.items() if v is not None}  # null deletes
            workload["spec"].update(body["spec"])
            return copy.deepcopy(workload)
        if _content_type == JSON_PATCH:  # test, replace and remove ops, on managedFields
            self.calls.append(("fold", plural, name, field_manager))
            obj = self.rayjobs[ns, name]
            for op in body:
                *path, last = [int(p) if p.isdigit() else p for p in op["path"].split("/")[1:]]
                parent = functools.reduce(lambda node, p: node[p], path, obj)
                if op["op"] == "test" and parent[last] != op["value"]:
                    raise ApiException(status=422, reason="Unprocessable Entity")
                if op["op"] == "replace":
                    parent[last] = copy.deepcopy(op["value"])
                if op["op"] == "remove":
                    del parent[last]
            return copy.deepcopy(obj)
        self.calls.append(("apply", plural, name, field_manager, force, _content_type))
        obj = self.rayjobs.setdefault((ns, name), {"status": {}})
        mine = {"manager": field_manager, "operation": "Apply", "fieldsV1": {"f:spec": {}}}
        managed = [e for e in obj.get("metadata", {}).get("managedFields", []) if e["operation"] != "Apply"]
        return SimpleNamespace(data=json.dumps(self._store(obj, body, [mine, *managed])).encode())  # the raw response

    def get_namespaced_custom_object(self, group, version, ns, plural, name):
        self.calls.append(("get", plural, name))
        return self.reads.pop(0) if self.reads else copy.deepcopy(self.rayjobs[ns, name])

    def create_namespaced_custom_object(self, group, version, ns, plural, body, field_manager=None):
        name = body["metadata"]["name"]
        self.calls.append(("create", plural, name, field_manager))
        if (ns, name) in self.rayjobs:
            raise ApiException(status=409, reason="Conflict")
        return self._store(self.rayjobs.setdefault((ns, name), {"status": {}}), body,
                           [{"manager": field_manager, "operation": "Update", "fieldsV1": {"f:metadata": {}, "f:spec": {}}}])

    def _store(self, obj: dict, body: dict, managed: list[dict]):
        obj.update({k: copy.deepcopy(v) for k, v in body.items() if k != "status"})
        obj["metadata"].update(uid=f"uid-of-{obj['metadata']['name']}", managedFields=managed)  # the apiserver's
        return copy.deepcopy(obj)

    def patch_namespaced_custom_object_status(self, group, version, ns, plural, name, body, field_manager=None, force=None,
                                              _content_type=None, _preload_content=True):
        self.calls.append(("status", plural, name, field_manager, force, _content_type))
        self.statuses.append(copy.deepcopy(body["status"]))
        return SimpleNamespace(data=json.dumps(body).encode())

    def list_namespaced_custom_object(self, group, version, ns, plural, label_selector=None):
        self.calls.append(("list", plural, label_selector))
        return {"items": self.workloads}

    # CoreV1Api
    def read_namespaced_pod(self, name, ns):
        if (ns, name) not in self.pods:
            raise ApiException(status=404, reason="Not Found")
        return self.pods[ns, name]

    # AuthenticationV1Api
    def create_token_review(self, review: client.V1TokenReview):
        self.calls.append(("tokenreview",))
        known = self.tokens.get(review.spec.token)
        if known is None or review.spec.audiences != ["finetune-operator"]:
            return client.V1TokenReview(spec=review.spec, status=client.V1TokenReviewStatus(authenticated=False, error="invalid bearer token"))
        ns, pod, pod_uid = known
        user = client.V1UserInfo(username=f"system:serviceaccount:{ns}:default", extra={
            "authentication.kubernetes.io/pod-name": [pod], "authentication.kubernetes.io/pod-uid": [pod_uid]})
        return client.V1TokenReview(spec=review.spec, status=client.V1TokenReviewStatus(
            authenticated=True, audiences=["finetune-operator"], user=user))

    def watched(self, ns: str = "team-a", name: str = "sft") -> dict:
        """The RayJob as the operator's watch holds it."""
        return cached(copy.deepcopy(self.rayjobs[ns, name]))

    def count(self, *what: str) -> int:
        return sum(c[0] in what for c in self.calls)


@pytest.fixture
def fake():
    return Recording()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def events():
    return []


def new_reconciler(fake, clock, events) -> Reconciler:
    """An operator replica over the recording client (a second one is a restart)."""
    return Reconciler(Apis(fake, fake, fake), Cache(fake.rayjob_owner, fake.uid), Settings(report_url="http://op:8081/v1/progress"),
                      post_event=lambda body, type, reason, message: events.append((type, reason)), clock=clock)


@pytest.fixture
def reconciler(fake, clock, events):
    return new_reconciler(fake, clock, events)


def body(tmp_path, **spec) -> dict:
    doc = job_doc("sft", tmp_path, TINY_LLAMA, **spec)
    doc["metadata"].update(namespace="team-a", uid=UID, generation=1)
    return doc


def kuberay(fake: Recording, **status) -> dict:
    """The RayJob as the watch delivers it after KubeRay wrote its status."""
    fake.rayjobs["team-a", "sft"]["status"] = {"rayClusterName": "sft-raycluster-abcde", **status}
    return fake.watched()


def head_pod(fake: Recording, job: str = "sft", cluster: str = "sft-raycluster-abcde", name: str = "sft-head", token: str = TOKEN) -> None:
    fake.pods["team-a", name] = client.V1Pod(metadata=client.V1ObjectMeta(
        name=name, namespace="team-a", uid=f"uid-of-{name}", labels={"finetune.dev/job": job, "ray.io/cluster": cluster}))
    fake.tokens[token] = ("team-a", name, f"uid-of-{name}")


def report(step: int, updated: float, **extra) -> dict:
    progress = {"state": "Running", "step": step, "totalSteps": 10, "updated": updated, "metrics": {"train_loss": 2.0 - step / 10}, **extra}
    return {"kind": "FineTuneJob", "namespace": "team-a", "name": "sft", "uid": UID, "progress": progress}


def test_a_new_job_gets_its_rayjob_created_once_and_one_status_per_change(reconciler, fake, events, tmp_path):
    job = body(tmp_path)
    status = reconciler.reconcile(job, None)
    assert [c for c in fake.calls if c[0] != "status"] == [("create", "rayjobs", "sft", FIELD_MANAGER)]
    assert status["phase"] == "Initializing" and fake.count("status") == 1 and events == [("Normal", "Initializing")]
    rayjob = fake.watched()
    assert SPEC_HASH in rayjob["metadata"]["annotations"]
    # The same again (the watch delivering what was just written): nothing to apply, nothing to write.
    reconciler.reconcile({**job, "status": status}, rayjob)
    assert fake.count("create", "apply") == 1 and fake.count("status") == 1 and len(events) == 1
    # KubeRay moves the RayJob on: one status write and one Event, still no apply.
    reconciler.reconcile(job, kuberay(fake, jobDeploymentStatus="Running", jobStatus="RUNNING"))
    assert fake.count("create", "apply") == 1 and fake.count("status") == 2 and events[-1] == ("Normal", "Training")
    # A spec change moves the hash: applied, once the create's fields are the applier's (else an
    # apply that leaves a field out would not remove it).
    reconciler.reconcile(body(tmp_path, resources={"nodes": 3}), kuberay(fake, jobDeploymentStatus="Running"))
    assert [c[0] for c in fake.calls if c[0] != "status"] == ["create", "get", "fold", "apply"]
    assert ("apply", "rayjobs", "sft", FIELD_MANAGER, True, "application/apply-patch+yaml") in fake.calls
    rayjob = fake.rayjobs["team-a", "sft"]
    assert rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 3
    assert [(e["manager"], e["operation"]) for e in rayjob["metadata"]["managedFields"]] == [(FIELD_MANAGER, "Apply")]
    resized = body(tmp_path, resources={"nodes": 4})
    resized["metadata"]["generation"] = 2
    reconciler.reconcile(resized, kuberay(fake, jobDeploymentStatus="Running"))
    assert [c[0] for c in fake.calls if c[0] != "status"] == ["create", "get", "fold", "apply", "get", "apply"]


def test_a_write_between_the_folds_read_and_its_patch_is_read_again(reconciler, fake, tmp_path):
    """KubeRay writes its status all the time: a write that moved the managedFields entries since
    our read fails the fold's test ops (422), and the fold is made from a second read."""
    reconciler.reconcile(body(tmp_path), None)
    live = fake.rayjobs["team-a", "sft"]
    fake.reads = [copy.deepcopy(live)]  # our read, and then KubeRay's write
    live["metadata"]["managedFields"].insert(0, {"manager": "kuberay-operator", "operation": "Update", "fieldsV1": {"f:status": {}}})
    changed = body(tmp_path, resources={"nodes": 3})
    changed["metadata"]["generation"] = 2
    reconciler.reconcile(changed, kuberay(fake, jobDeploymentStatus="Running"))
    assert [c[0] for c in fake.calls if c[0] != "status"] == ["create", "get", "fold", "get", "fold", "apply"]
    assert [(e["manager"], e["operation"]) for e in live["metadata"]["managedFields"]] == [
        (FIELD_MANAGER, "Apply"), ("kuberay-operator", "Update")]


def test_our_status_coming_back_before_the_rayjob_applies_nothing_again(reconciler, fake, clock, tmp_path):
    """The watch of our status write can beat the watch of the RayJob just made (for 91-132 of
    1,000 jobs created back to back, bench/operator_latency.py): the apply's answer stands in for it,
    so it is not applied again (for a queued job that would re-suspend what Kueue admitted)."""
    job = body(tmp_path)
    status = reconciler.reconcile(job, None)
    assert reconciler.reconcile({**job, "status": status}, None) == status
    assert fake.count("create", "apply") == 1
    reconciler.rayjob_deleted(UID)  # deleted by someone: made again
    reconciler.reconcile({**job, "status": status}, None)
    assert fake.count("create", "apply") == 2
    clock.now += 31  # a RayJob the watch never showed is not stood in for long
    reconciler.reconcile({**job, "status": status}, None, check=True)
    assert fake.count("create", "apply") == 3


def test_events_and_polls_that_bring_nothing_new_build_nothing(reconciler, fake, tmp_path, monkeypatch):
    """Our own writes come back as watch events and every job is polled: with the inputs of the
    last reconcile, its status stands and nothing is parsed or built (1,000 jobs make many such calls)."""
    import finetune_operator.reconcile as reconcile

    ops, built = reconcile.OPS["FineTuneJob"], []
    monkeypatch.setitem(reconcile.OPS, "FineTuneJob", ops._replace(status=lambda *args: built.append(args) or ops.status(*args)))
    job = body(tmp_path)
    status = reconciler.reconcile(job, None)
    echo = fake.watched()  # the watch delivering our apply
    for _ in range(3):
        assert reconciler.reconcile({**job, "status": status}, copy.deepcopy(echo), check=True) == status
    assert len(built) == 1 and fake.count("create", "apply") == 1
    reconciler.reconcile(job, kuberay(fake, jobDeploymentStatus="Initializing"))  # KubeRay's word is new
    assert len(built) == 2


def test_a_rayjob_of_the_same_name_that_is_not_ours_is_left_alone(reconciler, fake, tmp_path):
    fake.rayjobs["team-a", "sft"] = {"metadata": {"name": "sft", "namespace": "team-a", "ownerReferences": []}, "spec": {}}
    status = reconciler.reconcile(body(tmp_path), None)
    assert fake.count("create", "apply") == 0
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "RayJobNameTaken"
    del fake.rayjobs["team-a", "sft"]  # theirs deleted: the next look (a poll, nothing else changed) makes ours
    status = reconciler.reconcile({**body(tmp_path), "status": status}, None, check=True)
    assert fake.count("create", "apply") == 1 and status["rayJobName"] == "sft"


def test_a_job_in_a_namespace_being_deleted_creates_nothing_and_raises_nothing(reconciler, fake, tmp_path):
    def refuse(body: dict | None):
        err = ApiException(status=403, reason="Forbidden")
        err.body = json.dumps(body) if body else None

        def patch(*args, **kwargs):
            raise err
        return patch

    fake.create_namespaced_custom_object = refuse({"details": {"causes": [{"reason": "NamespaceTerminating"}]}})
    assert reconciler.reconcile(body(tmp_path), None) is None and fake.statuses == []
    fake.create_namespaced_custom_object = refuse(None)  # refused by RBAC: the operator's own fault, raised
    with pytest.raises(ApiException):
        reconciler.reconcile(body(tmp_path), None)


def test_a_deleted_job_is_forgotten_after_the_reconcile_running_for_it(reconciler, fake, tmp_path):
    """kopf's DELETED event can come while a reconcile (a report's, the poll's) runs for the job:
    what that reconcile memoizes after the forget would be kept for good."""
    reconciler.reconcile(body(tmp_path), None)
    held, written = threading.Event(), threading.Event()

    def running_reconcile():
        with reconciler.lock(UID):
            held.set()
            time.sleep(0.2)  # the forget comes meanwhile
            reconciler.inputs[UID] = reconciler.inputs[UID]
            written.set()

    worker = threading.Thread(target=running_reconcile)
    worker.start()
    held.wait(5)
    reconciler.forget(UID)
    assert written.is_set()  # it waited for the reconcile
    worker.join()
    memos = (reconciler.inputs, reconciler.written, reconciler.keys, reconciler.applied, reconciler.reports, reconciler._locks)
    assert not any(UID in memo for memo in memos)


def test_a_report_reaches_the_status_and_only_from_the_jobs_own_pods(reconciler, fake, tmp_path):
    job = body(tmp_path)
    reconciler.reconcile(job, None)
    rayjob = kuberay(fake, jobDeploymentStatus="Running", jobStatus="RUNNING")
    head_pod(fake)
    reconciler.receive(TOKEN, report(4, 10.0))
    status = reconciler.reconcile(job, rayjob)
    assert status["progress"] == {"step": 4, "totalSteps": 10, "percent": 40} and status["metrics"]["trainLoss"] == pytest.approx(1.6)
    reconciler.receive(TOKEN, report(3, 9.0))  # an older report, arriving late, does not win
    assert reconciler.reconcile(job, rayjob)["progress"]["step"] == 4
    assert fake.count("tokenreview") == 1  # the verified token is remembered for a while

    with pytest.raises(Rejected) as err:
        reconciler.receive("forged", report(5, 11.0))
    assert err.value.code == 401
    with pytest.raises(Rejected) as err:
        reconciler.receive(TOKEN, {**report(5, 11.0), "name": "other-job"})
    assert err.value.code == 403 and "does not run FineTuneJob team-a/other-job" in str(err.value)
    with pytest.raises(Rejected) as err:
        reconciler.receive(TOKEN, {"kind": "FineTuneJob"})
    assert err.value.code == 400
    # A pod of another job names itself, but the uid of this one: reports are kept by uid.
    head_pod(fake, name="other-head", job="other", token="token-of-other")
    with pytest.raises(Rejected) as err:
        reconciler.receive("token-of-other", {**report(9, 9e12, state="Failed", reason="InvalidInput"), "name": "other"})
    assert err.value.code == 403 and f"uid {UID} is not that of FineTuneJob team-a/other" in str(err.value)
    assert reconciler.reconcile(job, rayjob)["phase"] == "Running"


def test_a_final_report_replaced_before_its_reconcile_is_answered_when_its_successor_is_used(reconciler, fake, tmp_path):
    """The report endpoint answers a final report once a reconcile used it; a ping arriving
    first replaces it (carrying its progress), and the reconcile that uses the ping uses it too."""
    job = body(tmp_path)
    reconciler.reconcile(job, None)
    rayjob = kuberay(fake, jobDeploymentStatus="Running", jobStatus="RUNNING")
    head_pod(fake)
    final = reconciler.receive(TOKEN, report(10, 10.0, state="Succeeded"))
    ping = reconciler.receive(TOKEN, {k: v for k, v in report(10, 10.0).items() if k != "progress"})
    assert ping.progress is final.progress
    assert reconciler.reconcile(job, rayjob)["progress"]["step"] == 10
    assert ping.consumed.is_set() and final.consumed.is_set()  # its sender waited FINAL_REPORT_WAIT_SECONDS before


def test_a_report_from_another_ray_cluster_is_not_this_attempts(reconciler, fake, tmp_path):
    job = body(tmp_path)
    reconciler.reconcile(job, None)
    head_pod(fake, cluster="sft-raycluster-old")  # a pod of the cluster before a retry
    reconciler.receive(TOKEN, report(4, 10.0))
    assert "progress" not in reconciler.reconcile(job, kuberay(fake, jobDeploymentStatus="Running"))


def test_invalid_input_fails_at_once_and_kuberay_retries_nothing(reconciler, fake, events, tmp_path):
    job = body(tmp_path, retries=3)
    reconciler.reconcile(job, None)
    assert fake.rayjobs["team-a", "sft"]["spec"]["backoffLimit"] == 3
    head_pod(fake)
    failed = report(0, 10.0, state="Failed", reason="InvalidInput", error="spec.dataset.train row 0: no column 'label'")
    reconciler.receive(TOKEN, failed)
    status = reconciler.reconcile(job, kuberay(fake, jobDeploymentStatus="Running"))
    assert (status["phase"], status["reason"]) == ("Failed", "InvalidInput") and "no column 'label'" in status["message"]
    assert fake.rayjobs["team-a", "sft"]["spec"]["backoffLimit"] == 0  # applied before KubeRay sees the driver exit
    assert events[-1] == ("Warning", "InvalidInput")


def test_a_finished_jobs_status_survives_an_operator_restart(reconciler, fake, events, clock, tmp_path):
    """Reports live in the operator's memory: a new replica (restart, failover) finds the run's
    last word only in the status, which stands, and applies nothing (KubeRay's backoffLimit stays 0)."""
    job = body(tmp_path, retries=3)
    reconciler.reconcile(job, None)
    head_pod(fake)
    reconciler.receive(TOKEN, report(0, 10.0, state="Failed", reason="InvalidInput", error="spec.dataset.train row 0: no column 'label'"))
    running = kuberay(fake, jobDeploymentStatus="Running")
    status = reconciler.reconcile(job, running)
    failed = kuberay(fake, jobDeploymentStatus="Failed", jobStatus="FAILED", reason="AppFailed", message="exit code 1", failed=1)
    status = reconciler.reconcile({**job, "status": status}, failed)
    assert (status["reason"], status["attempts"]) == ("InvalidInput", 1)
    applies, posted = fake.count("create", "apply"), len(events)
    assert new_reconciler(fake, clock, events).reconcile({**job, "status": status}, failed) == status
    assert fake.count("create", "apply") == applies and len(events) == posted and fake.rayjobs["team-a", "sft"]["spec"]["backoffLimit"] == 0


def test_a_run_that_stops_reporting_shows_it(reconciler, fake, clock, tmp_path):
    job = body(tmp_path)
    reconciler.reconcile(job, None)
    rayjob = kuberay(fake, jobDeploymentStatus="Running")
    head_pod(fake)
    reconciler.receive(TOKEN, report(4, 10.0))
    assert reconciler.reconcile(job, rayjob, check=True)["conditions"][0]["status"] == "True"
    clock.now += STALE_SECONDS + 1
    status = reconciler.reconcile(job, rayjob, check=True)
    ready = status["conditions"][0]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "ReportsStopped")
    assert status["phase"] == "Running" and "ray.io/cluster=sft-raycluster-abcde" in ready["message"]
    reconciler.receive(TOKEN, {**report(5, 20.0), "progress": None} | {"progress": report(5, 20.0)["progress"]})
    assert reconciler.reconcile(job, rayjob)["conditions"][0]["status"] == "True"


def test_pods_that_cannot_start_name_the_missing_secret(reconciler, fake, tmp_path):
    job = body(tmp_path, storage={"uri": "s3://b/runs", "credentialsSecret": {"name": "s3-creds"}})
    reconciler.reconcile(job, None)
    head = {"metadata": {"name": "sft-head"}, "status": {"containerStatuses": [{"name": "ray-head", "state": {"waiting": {
        "reason": "CreateContainerConfigError", "message": 'secret "s3-creds" not found'}}}]}}
    status = reconciler.reconcile(job, kuberay(fake, jobDeploymentStatus="Initializing"), [head])
    assert (status["phase"], status["reason"]) == ("Initializing", "SecretNotFound") and "s3-creds" in status["message"]
    # Once the cluster runs, pod trouble is KubeRay's to handle: the status says what the run says.
    assert reconciler.reconcile(job, kuberay(fake, jobDeploymentStatus="Running"), [head])["reason"] == "Training"


def test_a_queued_job_says_why_kueue_waits(reconciler, fake, tmp_path):
    job = body(tmp_path, queueName="gpu")
    reconciler.reconcile(job, None)
    assert fake.rayjobs["team-a", "sft"]["spec"]["suspend"] is True
    fake.workloads = [{"metadata": {"name": "rayjob-sft-1a2b3", "namespace": "team-a"}, "spec": {"active": True},
                       "status": {"conditions": [{"type": "QuotaReserved", "status": "False",
                                                  "message": "couldn't assign flavors to pod set workers: insufficient unused quota"}]}}]
    rayjob = fake.watched()
    rayjob["metadata"]["uid"] = "rj-uid"
    status = reconciler.reconcile(job, rayjob, check=True)
    assert (status["phase"], status["reason"]) == ("Suspended", "Queued") and "insufficient unused quota" in status["message"]
    assert ("list", "workloads", "kueue.x-k8s.io/job-uid=rj-uid") in fake.calls


def test_a_queued_job_the_user_suspends_has_its_workload_held_until_resumed(reconciler, fake, tmp_path):
    """Kueue unsuspends what it admitted: a user's suspend holds through the Workload's spec.active
    (the control-plane tier runs this against the real Kueue, test_kueue.py)."""
    created_suspended = reconciler.reconcile(body(tmp_path, queueName="gpu", suspend=True), None)
    assert created_suspended["phase"] == "Suspended" and fake.count("create", "apply") == 0  # no RayJob for Kueue to admit
    job = body(tmp_path, queueName="gpu")
    reconciler.reconcile(job, None)
    rayjob = fake.watched()
    rayjob["metadata"]["uid"] = "rj-uid"
    running = {**rayjob, "spec": {**rayjob["spec"], "suspend": False}}  # admitted: Kueue unsuspended it
    reconciler.reconcile(job, running)  # no Workload yet: nothing to do
    workload = {"metadata": {"name": "rayjob-sft-1a2b3", "namespace": "team-a"}, "spec": {"active": True}}
    fake.workloads = [workload]

    def patches():
        return [c[3] for c in fake.calls if c[0] == "patch"]

    suspended = body(tmp_path, queueName="gpu", suspend=True)
    suspended["metadata"]["generation"] = 2
    reconciler.reconcile(suspended, running)
    assert fake.rayjobs["team-a", "sft"]["spec"]["suspend"] is True
    assert patches() == [{"metadata": {"annotations": {"finetune.dev/suspended": "true"}}, "spec": {"active": False}}]
    reconciler.reconcile(suspended, rayjob, check=True)  # held already: nothing more
    assert len(patches()) == 1
    assert workload["metadata"]["annotations"] == {"finetune.dev/suspended": "true"} and workload["spec"]["active"] is False
    resumed = {**job, "metadata": {**job["metadata"], "generation": 3}}
    reconciler.reconcile(resumed, rayjob)
    assert patches()[1:] == [{"metadata": {"annotations": {"finetune.dev/suspended": None}}, "spec": {"active": True}}]
    assert workload["spec"]["active"] is True and workload["metadata"]["annotations"] == {}


def test_the_hold_leaves_kueues_own_deactivation_and_catches_a_replaced_workload(reconciler, fake, tmp_path):
    job = body(tmp_path, queueName="gpu")
    reconciler.reconcile(job, None)
    rayjob = fake.watched()
    kueues = {"metadata": {"name": "rayjob-sft-1", "namespace": "team-a"}, "spec": {"active": False}}  # e.g. its requeuing limit
    fake.workloads = [kueues]

    def generation(n: int, suspend: bool) -> dict:
        doc = body(tmp_path, queueName="gpu", suspend=suspend)
        doc["metadata"]["generation"] = n
        return doc

    reconciler.reconcile(generation(2, True), rayjob)
    reconciler.reconcile(generation(3, False), rayjob)  # a suspend and resume leave Kueue's decision alone
    reconciler.reconcile(generation(4, True), rayjob)
    assert fake.count("patch") == 0 and kueues["spec"]["active"] is False
    # Held, and Kueue replaced the Workload with an active one (it does when one that still holds
    # quota stops matching the RayJob's pods) and admitted it: held too.
    fake.workloads = [{"metadata": {"name": "rayjob-sft-2", "namespace": "team-a"}, "spec": {"active": True}}]
    latest = fake.watched()
    running = {**latest, "spec": {**latest["spec"], "suspend": False}, "status": {"jobDeploymentStatus": "Running"}}
    fake.refusals = 1  # refused once: the status is still written, and the next look tries again
    assert reconciler.reconcile(generation(4, True), running)["observedGeneration"] == 4
    assert fake.workloads[0]["spec"]["active"] is True
    reconciler.reconcile(generation(4, True), running, check=True)
    assert fake.workloads[0]["spec"]["active"] is False and fake.count("patch") == 2


def test_a_finished_job_whose_rayjob_is_gone_is_not_trained_again(reconciler, fake, tmp_path):
    job = body(tmp_path)
    reconciler.reconcile(job, None)
    done = reconciler.reconcile(job, kuberay(fake, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED"))
    assert done["phase"] == "Succeeded"
    applied = fake.count("create", "apply")
    reconciler.reconcile({**job, "status": done}, None)
    assert fake.count("create", "apply") == applied


# ---- the Lease


class Leases:
    """Stands in for CoordinationV1Api: one Lease, compare-and-swap on resourceVersion."""

    def __init__(self):
        self.lease: client.V1Lease | None = None
        self.version = 0

    def read_namespaced_lease(self, name, ns):
        if self.lease is None:
            raise ApiException(status=404, reason="Not Found")
        return copy.deepcopy(self.lease)

    def create_namespaced_lease(self, ns, lease):
        if self.lease is not None:
            raise ApiException(status=409, reason="Conflict")
        self._store(lease)

    def replace_namespaced_lease(self, name, ns, lease):
        if lease.metadata.resource_version != self.lease.metadata.resource_version:
            raise ApiException(status=409, reason="Conflict")
        self._store(lease)

    def _store(self, lease):
        self.version += 1
        lease = copy.deepcopy(lease)
        lease.metadata.resource_version = str(self.version)
        self.lease = lease


def test_one_replica_leads_the_other_takes_over_only_after_a_whole_lease_duration(clock):
    leases = Leases()
    a = LeaderElector(leases, "op", "ns", "a", address="http://10.0.0.1:8081/v1/progress", clock=clock)
    b = LeaderElector(leases, "op", "ns", "b", address="http://10.0.0.2:8081/v1/progress", clock=clock)
    assert a.try_acquire() and not b.try_acquire()
    assert b.leader_address() == "http://10.0.0.1:8081/v1/progress"  # where b redirects reports
    leases.lease.spec.renew_time = datetime.now(timezone.utc)  # a renews: the record moves
    clock.now += 14
    assert not b.try_acquire()  # a's renewal was seen 0 s ago by b's clock
    clock.now += 16
    assert b.try_acquire() and leases.lease.spec.holder_identity == "b"  # a went silent for a whole duration
    assert leases.lease.metadata.annotations[ADDRESS] == "http://10.0.0.2:8081/v1/progress"
    assert leases.lease.spec.lease_transitions == 1
    b.release()
    assert leases.lease.spec.holder_identity is None and a.try_acquire()  # handed over at once

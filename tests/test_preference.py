"""Preference tuning (DPO, IPO): the loss against the papers' formulas and a hand computation on
trained models, the pair data formats and their errors, resume, sweeps and the example."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import REPO, TINY_LLAMA, WORDS, job_doc, make_job
from finetune_api.spec import PreferenceSpec, parse_job
from finetune_api.status import Progress
from finetune_train.data import DataError, check_file, load_splits, preference_row, token_table
from finetune_train.loss import IGNORE
from finetune_train.modeling import load_tokenizer, model_folder
from finetune_train.preference import pair_losses, sequence_logps

TINY_PREFERENCE = {**TINY_LLAMA, "task": "preference"}
GOOD = ["the cat sat on the mat", "the dog ran under the tree", "a bird flew over the rug"]


def write_pairs(path: Path, rows: int = 48, seed: int = 2) -> Path:
    """Strings (TRL's standard format): chosen is one of three tidy sentences, rejected a jumble."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"prompt": " ".join(rng.sample(WORDS, 4)) + ":", "chosen": " " + rng.choice(GOOD),
                                "rejected": " " + " ".join(rng.sample(WORDS, 6))}) + "\n")
    return path


def preference_doc(name: str, tmp_path: Path, model: dict = TINY_PREFERENCE, **overrides) -> dict:
    train = write_pairs(tmp_path / "pairs.jsonl")
    doc = job_doc(name, tmp_path, model, **overrides)
    doc["spec"]["dataset"] = {"train": str(train), "validationSplit": 0.25, "maxLength": 32, **overrides.get("dataset", {})}
    return doc


# ---- the loss (unit)


@pytest.mark.unit
@pytest.mark.parametrize("loss, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_pair_losses_are_the_papers_formulas(loss, smoothing):
    policy = torch.tensor([-3.0, -5.0, -4.0, -4.5])  # chosen of pairs 0 and 1, then their rejected
    reference = torch.tensor([-3.5, -4.0, -4.2, -4.0])
    beta = 0.3
    pairs = pair_losses(policy, reference, PreferenceSpec(loss=loss, beta=beta, label_smoothing=smoothing))
    for i in range(2):
        margin = (policy[i] - reference[i]) - (policy[2 + i] - reference[2 + i])
        if loss == "ipo":
            expected = (margin - 1 / (2 * beta)) ** 2
        else:
            expected = -(1 - smoothing) * F.logsigmoid(beta * margin) - smoothing * F.logsigmoid(-beta * margin)
        assert pairs.losses[i].item() == pytest.approx(expected.item(), rel=1e-6)
        assert pairs.chosen[i].item() == pytest.approx(beta * (policy[i] - reference[i]).item())
        assert pairs.rejected[i].item() == pytest.approx(beta * (policy[2 + i] - reference[2 + i]).item())


@pytest.mark.unit
def test_sequence_log_probs_count_only_the_completion_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[IGNORE, IGNORE, 4, 7, 1, 9], [IGNORE, 3, 3, 2, IGNORE, IGNORE]])
    expected = []
    for row in range(2):
        logps = [logits[row, i - 1].log_softmax(-1)[labels[row, i]] for i in range(1, 6) if labels[row, i] != IGNORE]
        expected.append((sum(logps).item(), sum(logps).item() / len(logps)))
    total, average = sequence_logps(logits, labels), sequence_logps(logits, labels, average=True)
    assert total.tolist() == pytest.approx([e[0] for e in expected], rel=1e-5)
    assert average.tolist() == pytest.approx([e[1] for e in expected], rel=1e-5)


# ---- data (unit)


def preference_spec(tmp_path, **dataset):
    return make_job("pairs", tmp_path, TINY_PREFERENCE, dataset={"train": "x.jsonl", "maxLength": 24, **dataset}).spec


@pytest.mark.unit
def test_rows_in_both_of_trls_formats(tmp_path):
    d = preference_spec(tmp_path).dataset
    assert (d.prompt_column, d.chosen_column, d.rejected_column) == ("prompt", "chosen", "rejected")
    assert preference_row({"prompt": "Q?", "chosen": "yes", "rejected": "no"}, 0, "train", d) == ("Q?", "yes", "no")
    user, yes, no = {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "yes"}, {"role": "assistant", "content": "no"}
    assert preference_row({"prompt": [user], "chosen": [yes], "rejected": [no]}, 0, "train", d) == ([user], [yes], [no])
    # Conversational without a prompt column: the messages both begin with are the prompt.
    assert preference_row({"chosen": [user, yes], "rejected": [user, no]}, 0, "train", d) == ([user], [yes], [no])


@pytest.mark.unit
def test_pairs_mask_the_prompt_and_truncate_completions_never_prompts(tmp_path, caplog, monkeypatch):
    import finetune_train.data as data

    monkeypatch.setattr(data, "CACHE", tmp_path / "cache")
    spec = preference_spec(tmp_path, validationSplit=None)
    tokenizer = load_tokenizer(spec, model_folder(spec))
    rows = [{"prompt": "Say it:", "chosen": " the cat sat", "rejected": " dog ran"},
            {"prompt": "Say it:", "chosen": " " + "cat " * 40, "rejected": " dog"},  # truncated to fit maxLength
            {"prompt": "word " * 30, "chosen": " cat", "rejected": " dog"},  # the prompt alone fills maxLength
            {"prompt": "Say it:", "chosen": " same", "rejected": " same"}]  # nothing to prefer
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = token_table(str(path), "train", spec, tokenizer)
    prompt = tokenizer("Say it:")["input_ids"]
    ids, labels = table.example(0)
    assert ids[: len(prompt)].tolist() == prompt and (labels[: len(prompt)] == IGNORE).all()
    assert tokenizer.decode(labels[len(prompt):]) == " the cat sat" + tokenizer.eos_token
    r_ids, r_labels = table.rejected(0)
    assert tokenizer.decode(r_labels[r_labels != IGNORE]) == " dog ran" + tokenizer.eos_token
    ids, labels = table.example(1)
    assert len(ids) == 24 and ids[: len(prompt)].tolist() == prompt
    assert table.targets.tolist() == [1, 1, 0, 0]
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        splits = load_splits(spec, lambda p, split: token_table(p, split, spec, tokenizer), str(path))
    assert sorted(splits.train.rows.tolist()) == [0, 1]
    assert "2 of 4 rows left out" in caplog.text and "rows [2, 3]" in caplog.text


MALFORMED_PAIRS = [
    ("missing-rejected", [{"prompt": "a", "chosen": "b"}] * 3, "row 0: no column 'rejected'"),
    ("empty-chosen", [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": " ", "rejected": "c"}],
     "row 1: 'chosen' is empty"),
    ("chosen-equals-rejected", [{"prompt": "a", "chosen": "b", "rejected": "b"}] * 3, "in every row 'chosen' equals 'rejected'"),
    ("messages-and-string", [{"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"}],
     "row 0: 'chosen' and 'rejected' must both be strings or both be lists of messages"),
    ("no-prompt", [{"chosen": "b", "rejected": "c"}], "row 0: no column 'prompt'"),
]


@pytest.mark.unit
@pytest.mark.parametrize("rows, words", [c[1:] for c in MALFORMED_PAIRS], ids=[c[0] for c in MALFORMED_PAIRS])
def test_malformed_pairs_are_refused_before_training_naming_the_row(tmp_path, rows, words):
    from finetune_train import launch
    from finetune_train.storage import Store

    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = preference_spec(tmp_path, train=str(path))
    with pytest.raises(DataError, match=words.replace("(", r"\(")):
        check_file(str(path), "train", spec)
    job = parse_job(preference_doc("bad", tmp_path, dataset={"train": str(path)}))
    (problem,) = launch.check_inputs(job, Store.of(job.spec.storage))  # what `finetune run` and the RayJob entrypoint do
    assert problem.startswith("spec.dataset.train") and words in problem


# ---- training (real Ray, DeepSpeed on CPU)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from finetune_train import launch

    launch.init_ray(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def train(doc: dict):
    from finetune_train import launch
    from finetune_train.storage import paths_for

    job = parse_job(doc)
    paths = paths_for(job)
    result = launch.run(job, paths)
    assert result.error is None, result.error
    return paths, json.loads(Path(paths.output, "metrics.json").read_text())


def hand_computed(policy, reference, tokenizer, rows: list[dict], beta: float) -> dict:
    """DPO's loss and reward accuracy from two plain transformers models, written out: the log-
    probability of each completion's tokens after its prompt, log-ratios, -log σ(β × margin)."""
    def logp(model, prompt: str, completion: str) -> float:
        p = tokenizer(prompt)["input_ids"]
        c = tokenizer(completion + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c])).logits[0]
        return sum(logits[len(p) + i - 1].log_softmax(-1)[tok].item() for i, tok in enumerate(c))

    losses, right = [], 0
    for row in rows:
        ratio = {k: logp(policy, row["prompt"], row[k]) - logp(reference, row["prompt"], row[k]) for k in ("chosen", "rejected")}
        margin = ratio["chosen"] - ratio["rejected"]
        losses.append(-F.logsigmoid(torch.tensor(beta * margin)).item())
        right += margin > 0
    return {"eval_loss": sum(losses) / len(losses), "eval_rewards_accuracy": right / len(rows)}


@pytest.mark.training
@pytest.mark.parametrize("stage, method, workers", [(0, "lora", 1), (3, "lora", 2), (3, "full", 2)])
def test_the_dpo_loss_of_a_trained_model_matches_a_hand_computed_one(ray_local, tmp_path, stage, method, workers):
    """After 2 steps the exported model is the policy and the starting model the reference
    (LoRA: the adapters switched off; full: a frozen copy, partitioned under ZeRO-3): the
    evaluation the program reports equals the loss computed by hand from the two."""
    from transformers import AutoModelForCausalLM

    from finetune_train.modeling import build_model

    spec = make_job("base", tmp_path, TINY_LLAMA).spec
    source = model_folder(spec)
    tokenizer = load_tokenizer(spec, source)
    torch.manual_seed(0)
    build_model(spec, source, tokenizer, pretrained=True).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    validation = write_pairs(tmp_path / "validation.jsonl", rows=6, seed=9)
    lora = {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}} if method == "lora" else {"type": "full"}
    doc = preference_doc(f"dpo-{stage}-{method}", tmp_path, model={"source": str(tmp_path / "base"), "task": "preference"},
                         dataset={"validation": str(validation), "validationSplit": None}, method=lora,
                         deepspeed={"zeroStage": stage}, resources={"nodes": workers},
                         training={"maxSteps": 2, "lr": 0.05, "preference": {"beta": 0.5}})
    paths, metrics = train(doc)
    policy = AutoModelForCausalLM.from_pretrained(Path(paths.output, "model")).eval()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    rows = [json.loads(line) for line in validation.read_text().splitlines()]
    expected = hand_computed(policy, reference, tokenizer, rows, beta=0.5)
    after = metrics["eval_after"]
    assert abs(after["eval_loss"] - 0.6931) > 0.01  # the policy moved away from the reference
    assert after["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-4)
    assert after["eval_rewards_accuracy"] == pytest.approx(expected["eval_rewards_accuracy"])
    assert metrics["eval_before"]["eval_loss"] == pytest.approx(0.6931472, rel=1e-5)  # policy = reference: log 2


def run_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a Ray of its own
    proc = subprocess.run([sys.executable, "-m", "finetune_cli.main", *args], capture_output=True, text=True, timeout=timeout, env=env)
    return proc


@pytest.mark.training
def test_a_killed_preference_run_resumes_with_the_same_history(tmp_path):
    from test_storage import Run, wait_for

    doc = preference_doc("dpo-resume", tmp_path, method={"type": "lora", "lora": {"r": 4}}, resources={"nodes": 1},
                         training={"maxSteps": 12, "evalEvery": 3}, checkpointing={"everySteps": 3})
    spec = tmp_path / "dpo.yaml"
    spec.write_text(yaml.safe_dump(doc))
    progress_file = tmp_path / "runs" / "dpo-resume" / "progress.json"
    progress = lambda: progress_file.exists() and Progress.model_validate_json(progress_file.read_text())  # noqa: E731
    first = Run(spec, {**os.environ, "RAY_ADDRESS": "local"})
    wait_for(lambda: (p := progress()) and p.latest_checkpoint and p.step >= 4, first, what="a checkpoint and step 4")
    first.kill_everything()
    again = Run(spec, {**os.environ, "RAY_ADDRESS": "local"})
    assert again.wait() == 0, again.output[-5000:]
    assert "resumed from" in again.output
    metrics = json.loads((tmp_path / "runs" / "dpo-resume" / "output" / "metrics.json").read_text())
    assert [p["step"] for p in metrics["train"]] == list(range(1, 13))  # every step once
    assert [e["step"] for e in metrics["eval"]] == [0, 3, 6, 9, 12]
    assert all("eval_rewards_margin" in e for e in metrics["eval"])


@pytest.mark.training
def test_a_preference_sweep_over_beta(tmp_path):
    template = preference_doc("t", tmp_path, method={"type": "lora", "lora": {"r": 4}}, resources={"nodes": 1},
                              training={"maxSteps": 4, "evalEvery": 2})["spec"]
    sweep = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneSweep", "metadata": {"name": "beta"},
             "spec": {"template": template, "searchSpace": {"training.preference.beta": {"choice": [0.1, 0.5]}},
                      "metric": "eval_rewards_accuracy", "mode": "max", "maxTrials": 2, "maxConcurrentTrials": 1}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    proc = run_cli("sweep", str(path), "--output", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    progress = Progress.model_validate_json((tmp_path / "runs" / "beta" / "progress.json").read_text())
    assert progress.state == "Succeeded" and len(progress.trials) == 2
    # Tune samples a choice at random (seeded), so two trials may draw the same beta.
    assert {t.params["training.preference.beta"] for t in progress.trials} <= {0.1, 0.5}
    assert progress.best_trial.metric is not None


@pytest.mark.training
def test_the_dpo_example_learns_its_preference(tmp_path):
    """The README's example, shortened: chosen answers gain reward over dismissive ones on
    held-out prompts, and the export is a causal LM."""
    from transformers import AutoModelForCausalLM

    doc = yaml.safe_load((REPO / "examples" / "smollm2-dpo.yaml").read_text())
    doc["spec"]["dataset"]["train"] = str(REPO / "examples" / "data" / "preferences.jsonl")
    doc["spec"]["dataset"]["validationSplit"] = 0.1
    doc["spec"]["training"].update({"maxSteps": 6, "evalEvery": 3})
    doc["spec"]["storage"] = {"uri": str(tmp_path / "runs")}
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc = run_cli("run", str(path), "--output", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    before, after = metrics["eval_before"], metrics["eval_after"]
    assert after["eval_rewards_accuracy"] > before["eval_rewards_accuracy"] + 0.5
    margins = [e["eval_rewards_margin"] for e in metrics["eval"]]
    assert margins == sorted(margins) and margins[-1] > margins[0] + 0.5
    assert "eval_rewards_accuracy" in proc.stdout
    AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")

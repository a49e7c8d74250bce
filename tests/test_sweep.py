"""FineTuneSweep on a local Ray: the search space as Tune distributions, and the MiniLM
learning-rate sweep of examples/sweeps/ end to end through `finetune sweep`, with ASHA
stopping trials that fall behind and the best trial's model exported; and a sweep on S3 (the moto
server) preempted by SIGTERM and continued."""

import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, S3_KEY_ID, S3_SECRET, TINY_BERT, job_doc
from finetune_api.status import DONE, Progress
from finetune_api.sweep import SearchParam, parse_sweep

EXAMPLE = REPO / "examples/sweeps/minilm-lr.yaml"


def read_progress(path) -> Progress:
    return Progress.model_validate_json(path.read_text())


@pytest.mark.unit
def test_search_space_maps_to_tune_distributions():
    from ray.tune.search.sample import Categorical, Float, Integer

    from finetune_train.sweep import param_space

    space = param_space({
        "training.lr": SearchParam(loguniform={"low": 1e-6, "high": 3e-4}),
        "training.weightDecay": SearchParam(uniform={"low": 0.0, "high": 0.1}),
        "method.lora.r": SearchParam(choice=[8, 16, 32]),
        "training.gradientAccumulationSteps": SearchParam(randint={"low": 1, "high": 4}),
    })
    lr, wd, r, gas = (space[k] for k in ("training.lr", "training.weightDecay", "method.lora.r", "training.gradientAccumulationSteps"))
    assert isinstance(lr, Float) and type(lr.get_sampler()).__name__ == "_LogUniform" and (lr.lower, lr.upper) == (1e-6, 3e-4)
    assert isinstance(wd, Float) and type(wd.get_sampler()).__name__ == "_Uniform" and (wd.lower, wd.upper) == (0.0, 0.1)
    assert isinstance(r, Categorical) and r.categories == [8, 16, 32]
    assert isinstance(gas, Integer) and (gas.lower, gas.upper) == (1, 4)  # [low, high), as SearchParam says
    assert set(gas.sample(size=200)) == {1, 2, 3}
    assert all(1e-6 <= v <= 3e-4 for v in lr.sample(size=200))


@pytest.mark.unit
def test_asha_rungs_count_evaluations_and_trials_have_stable_names():
    from finetune_train.sweep import EVALUATIONS, scheduler_for, trial_name

    sweep = parse_sweep(yaml.safe_load(EXAMPLE.read_text()))
    asha = scheduler_for(sweep)
    assert asha._time_attr == EVALUATIONS
    # maxSteps 30 / evalEvery 6: evaluations 1..5; rungs at gracePeriod x reductionFactor^k
    assert [milestone for milestone, _ in asha._brackets[0]._rungs] == [4, 2, 1]
    assert trial_name("minilm-lr", "3f2a1_00002") == "minilm-lr-trial-02"
    off = parse_sweep({**yaml.safe_load(EXAMPLE.read_text()), "spec": {**sweep.spec.model_dump(by_alias=True), "scheduler": {"type": "none"}}})
    assert scheduler_for(off) is None


@pytest.mark.unit
def test_validate_accepts_the_sweep_example():
    proc = subprocess.run([sys.executable, "-m", "finetune_cli.main", "validate", str(EXAMPLE), str(REPO / "examples/minilm-sentiment.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"ok      {EXAMPLE}: FineTuneSweep/minilm-lr",
                                        f"ok      {REPO / 'examples/minilm-sentiment.yaml'}: FineTuneJob/minilm-sentiment"]


@pytest.mark.training
@pytest.mark.timeout(2700)
def test_minilm_learning_rate_sweep_with_asha_end_to_end(tmp_path):
    """4 trials one at a time, each on one 2-CPU worker, i.e. all of a 2-core machine: a
    trial ASHA stopped whose Train run kept its resources would leave the next trial
    waiting for them forever."""
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a Ray of its own, not one another process started
    cmd = [sys.executable, "-m", "finetune_cli.main", "sweep", str(EXAMPLE), "--storage", str(tmp_path / "runs"), "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=2400, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    root = tmp_path / "runs" / "minilm-lr"
    progress = read_progress(root / "progress.json")
    assert (progress.kind, progress.state, progress.metric, progress.mode) == ("sweep", "Succeeded", "eval_accuracy", "max")
    trials = {t.name: t for t in progress.trials}
    assert sorted(trials) == [f"minilm-lr-trial-{i:02d}" for i in range(4)]
    assert all(t.state in DONE and t.error is None for t in trials.values()), trials
    lrs = [t.params["training.lr"] for t in trials.values()]
    assert len(set(lrs)) == 4 and all(1e-6 <= lr <= 1e-3 for lr in lrs)

    stopped = [t for t in trials.values() if t.state == "EarlyStopped"]
    finished = [t for t in trials.values() if t.state == "Succeeded"]
    assert stopped and finished, trials
    for t in stopped:  # stopped at an evaluation before the end; its Train run never got to export
        assert t.step < t.total_steps and not (root / t.name / "output").exists()
        assert read_progress(root / t.name / "progress.json").state == "EarlyStopped"

    # Like with like: every finished trial's final evaluation, from its own metrics.json.
    final = {t.name: json.loads((root / t.name / "output/metrics.json").read_text())["eval_after"]["eval_accuracy"] for t in finished}
    best = progress.best_trial
    assert best.name == max(final, key=final.get) and best.metric == final[best.name] == trials[best.name].metric
    assert best.params == trials[best.name].params
    best_metrics = json.loads((out / "metrics.json").read_text())
    assert best_metrics["eval_after"]["eval_accuracy"] == final[best.name]
    assert best_metrics["eval_after"]["eval_accuracy"] - best_metrics["eval_before"]["eval_accuracy"] >= 0.15  # it learned

    assert progress.model_uri == str(root / "best" / "model")
    for folder in (root / "best", out):
        assert {p.name for p in folder.iterdir()} >= {"model", "metrics.json", "loss.png", "sweep.png"}
        assert (folder / "sweep.png").stat().st_size > 0
    assert f"best trial: {best.name}" in proc.stdout and "EarlyStopped" in proc.stdout

    from transformers import pipeline

    classify = pipeline("text-classification", model=str(out / "model"))
    verdicts = classify(["Absolutely wonderful, I would buy it again tomorrow.", "Broke after two days and support never answered. Avoid."])
    assert [v["label"] for v in verdicts] == ["positive", "negative"]


@pytest.mark.training
@pytest.mark.timeout(600)
def test_a_sweep_whose_trials_all_fail_exits_1_naming_the_cause(tmp_path):
    """Input the checks pass but no trial can train on: one step needs more examples than there are."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"]["name"] = "broken"
    template = doc["spec"]["template"]
    template["dataset"]["train"] = str(REPO / "examples/data/sentiment.jsonl")
    template["training"]["microBatchSize"] = 65536
    template["checkpointing"]["maxFailures"] = 0
    doc["spec"].update(maxTrials=1, maxConcurrentTrials=1)
    manifest = tmp_path / "broken.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "RAY_ADDRESS": "local"}
    proc = subprocess.run([sys.executable, "-m", "finetune_cli.main", "sweep", str(manifest), "--storage", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=500, env=env)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    cause = "ValueError: dataset.train: "
    assert f"broken failed: no trial finished with a value of eval_accuracy; broken-trial-00: {cause}" in proc.stderr
    assert "cannot fill one step" in proc.stderr
    progress = read_progress(tmp_path / "runs/broken/progress.json")
    assert progress.state == "Failed" and progress.best_trial is None and progress.model_uri is None
    (trial,) = progress.trials
    assert trial.state == "Failed" and trial.error.startswith(cause)


@pytest.mark.unit
def test_a_sweep_whose_input_is_wrong_is_refused_before_any_trial(tmp_path):
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["template"]["dataset"].update(train=str(REPO / "examples/data/sentiment.jsonl"), labelColumn="stars")
    manifest = tmp_path / "broken.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    proc = subprocess.run([sys.executable, "-m", "finetune_cli.main", "sweep", str(manifest), "--storage", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "spec.template.dataset.train row 0: no column 'stars'" in proc.stderr and not (tmp_path / "runs").exists()


@pytest.mark.training
@pytest.mark.timeout(900)
def test_a_sweep_on_s3_preempted_by_sigterm_continues_each_trial_from_its_checkpoint(tmp_path, s3, s3_env):
    """Two trials of a tiny model one after the other, no scheduler, storage in S3. SIGTERM
    while the first trains: it checkpoints at the step it reached, the second never starts,
    the sweep exits 143 as Preempted. Run again: the first continues from that checkpoint,
    every trial's checkpoints are under `<uri>/<sweep>/<trial>/`, the best trial's export in
    `<uri>/<sweep>/best/` and copied to --output, and no credentials are printed."""
    from test_storage import Bucket, Run, wait_for

    bucket = Bucket(s3, "sweeps")
    template = job_doc("unused", tmp_path, TINY_BERT, resources={"nodes": 1},
                       training={"maxSteps": 40, "evalEvery": 10}, checkpointing={"keep": 1},
                       storage={"uri": "s3://sweeps/runs", "endpoint": s3.endpoint})["spec"]
    doc = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneSweep", "metadata": {"name": "on-s3"}, "spec": {
        "template": template, "searchSpace": {"training.lr": {"uniform": {"low": 0.001, "high": 0.01}}},
        "metric": "eval_loss", "scheduler": {"type": "none"}, "maxTrials": 2, "maxConcurrentTrials": 1}}
    manifest = tmp_path / "sweep.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    env = {**s3_env, "RAY_ADDRESS": "local"}

    first = Run(manifest, env, command="sweep")
    seen = wait_for(lambda: (p := bucket.progress("runs/on-s3/on-s3-trial-00")) and (p.step or 0) >= 2 and p.step,
                    first, what="trial 00 at step 2")
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait(timeout=300) == 143, first.output[-5000:]
    assert "on-s3 preempted; every running trial saved a checkpoint" in first.output
    progress = bucket.progress("runs/on-s3")
    assert progress.state == "Preempted" and progress.trials[0].state == "Preempted", progress
    assert [(t.state, t.step) for t in progress.trials[1:]] in ([], [("Preempted", 0)]), progress
    trial = bucket.progress("runs/on-s3/on-s3-trial-00")
    (checkpoint,) = trial.checkpoints  # no periodic checkpoints: the one SIGTERM asked for
    assert trial.state == "Preempted" and seen <= checkpoint.step == trial.step < 40
    assert not any(k.startswith("runs/on-s3/on-s3-trial-01/checkpoint_") for k in bucket.keys("runs/on-s3/"))

    out = tmp_path / "out"
    again = Run(manifest, env, "--output", str(out), command="sweep")
    assert again.wait(timeout=600) == 0, again.output[-5000:]
    progress = bucket.progress("runs/on-s3")
    assert progress.state == "Succeeded" and [t.state for t in progress.trials] == ["Succeeded", "Succeeded"]
    resumes = bucket.progress("runs/on-s3/on-s3-trial-00").resumes
    assert [(r.step, r.checkpoint) for r in resumes] == [(checkpoint.step, checkpoint.uri)]
    keys = bucket.keys("runs/on-s3/")
    for name in ("on-s3-trial-00", "on-s3-trial-01"):
        assert any(k.startswith(f"runs/on-s3/{name}/checkpoint_00000040/") for k in keys), name
        assert bucket.progress(f"runs/on-s3/{name}").state == "Succeeded"
    best = progress.best_trial.name
    assert progress.model_uri == "s3://sweeps/runs/on-s3/best/model"
    assert {"runs/on-s3/best/sweep.png", "runs/on-s3/best/metrics.json"} <= set(keys)
    assert bucket.json("runs/on-s3/best/metrics.json") == bucket.json(f"runs/on-s3/{best}/output/metrics.json")
    assert (out / "model" / "config.json").is_file() and (out / "sweep.png").is_file()
    for secret in (S3_KEY_ID, S3_SECRET):
        assert secret not in first.output + again.output + progress.model_dump_json()

"""FineTuneSweep without training: malformed search spaces rejected naming the field (by the
models and, where a schema can say it, by the apiserver), the RayJob of a sweep, its status,
and on the real control plane one RayJob per sweep with status following a driven
progress.json."""

import copy

import pytest
import yaml

from conftest import REPO, get, kubectl, wait_for
from finetune_api.spec import SpecError
from finetune_api.sweep import decode_sweep, parse_sweep
from finetune_operator.builders import build_sweep_rayjob
from finetune_api.status import Progress
from finetune_operator.status import Observed, build_sweep_status

TEMPLATE = yaml.safe_load((REPO / "examples/minilm-sentiment.yaml").read_text())["spec"]
BASE = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneSweep",
    "metadata": {"name": "lr-sweep"},
    "spec": {
        "template": {**TEMPLATE, "dataset": {**TEMPLATE["dataset"], "train": "s3://ftj/data.jsonl"}},
        "searchSpace": {"training.lr": {"loguniform": {"low": 1e-5, "high": 1e-3}}, "training.weightDecay": {"choice": [0.0, 0.01]}},
        "metric": "eval_accuracy",
        "maxTrials": 4,
        "maxConcurrentTrials": 2,
    },
}


def sweep_doc(**changes) -> dict:
    doc = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is None:
            doc["spec"].pop(key, None)
        else:
            doc["spec"][key] = value
    return doc


def space(**params) -> dict:
    return {"searchSpace": {k.replace("__", "."): v for k, v in params.items()}}


# (case, manifest, field the error names, the apiserver rejects it too)
MALFORMED = [
    ("unknown-field-path", sweep_doc(**space(training__lrate={"choice": [1e-4]})), "spec.searchSpace", True),
    # Each trial shares the sweep's Ray cluster, sized by the template: a trial cannot have its own.
    ("resources-per-trial", sweep_doc(**space(resources__nodes={"choice": [1, 4]})), "spec.searchSpace", True),
    ("a-field-inside-a-list", sweep_doc(**space(podTemplate__env__name={"choice": ["A"]})), "spec.searchSpace", True),
    ("empty-choice", sweep_doc(**space(training__lr={"choice": []})), "spec.searchSpace.training.lr.choice", True),
    ("low-above-high", sweep_doc(**space(training__lr={"uniform": {"low": 1e-3, "high": 1e-5}})), "spec.searchSpace.training.lr.uniform.low", True),
    ("scheduler-without-metric", sweep_doc(metric=None), "spec.metric", True),
    ("two-distributions", sweep_doc(**space(training__lr={"choice": [1e-4], "uniform": {"low": 1e-5, "high": 1e-3}})),
     "spec.searchSpace.training.lr.choice", True),
    ("no-distribution", sweep_doc(**space(training__lr={})), "spec.searchSpace.training.lr.choice", True),
    ("loguniform-from-zero", sweep_doc(**space(training__lr={"loguniform": {"low": 0, "high": 1e-3}})),
     "spec.searchSpace.training.lr.loguniform.low", True),
    ("more-concurrent-than-trials", sweep_doc(maxConcurrentTrials=5), "spec.maxConcurrentTrials", True),
    ("metric-of-another-task", sweep_doc(metric="eval_perplexity"), "spec.metric", False),
    ("a-trial-would-be-invalid", sweep_doc(**space(training__lr={"choice": [1e-4, -1.0]})), "spec.searchSpace.training.lr", False),
    ("asha-without-evaluations", sweep_doc(template={**BASE["spec"]["template"], "training": {"lr": 1e-4}}),
     "spec.template.training.evalEvery", False),
    ("suspend-in-the-template", sweep_doc(template={**BASE["spec"]["template"], "suspend": True}), "spec.template.suspend", True),
]


@pytest.mark.unit
def test_an_unknown_field_of_a_sweep_gets_the_sweeps_hints():
    with pytest.raises(SpecError) as info:
        parse_sweep(sweep_doc(maxTrial=3))
    (line,) = info.value.errors
    assert line.startswith("spec.maxTrial: unknown field; did you mean maxTrials? allowed here: template, searchSpace"), line


@pytest.mark.unit
@pytest.mark.parametrize("case, doc, field", [c[:3] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_sweeps_are_rejected_naming_the_field(case, doc, field):
    with pytest.raises(SpecError) as info:
        parse_sweep(doc)
    assert any(e.split(": ", 1)[0] == field for e in info.value.errors), info.value.errors


@pytest.mark.unit
def test_a_sweep_runs_in_one_rayjob_sized_for_its_concurrent_trials():
    doc = sweep_doc()
    doc["metadata"].update(namespace="team-a", uid="5e1f0c2a-0000-4000-8000-000000000001")
    sweep = parse_sweep(doc)
    rj = build_sweep_rayjob(sweep)
    assert rj["metadata"]["name"] == "lr-sweep-sweep" and rj["metadata"]["labels"]["finetune.dev/sweep"] == "lr-sweep"
    (owner,) = rj["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("FineTuneSweep", "lr-sweep", sweep.metadata.uid)
    group = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["replicas"] == 2 * sweep.spec.template.resources.nodes  # maxConcurrentTrials x nodes
    # The contract: what the entrypoint carries parses back into the same sweep.
    command = rj["spec"]["entrypoint"].split()
    assert command[:4] == ["python", "-m", "finetune_train", "--sweep"]
    assert decode_sweep(command[4]) == sweep.model_copy(update={"metadata": sweep.metadata.model_copy(update={"generation": None})})


PROGRESS = {
    "kind": "sweep", "state": "Running", "updated": 1_800_000_000.0, "max_trials": 4, "metric": "eval_accuracy", "mode": "max",
    "trials": [
        {"name": "lr-sweep-trial-00", "params": {"training.lr": 3e-4}, "state": "Succeeded", "step": 40, "total_steps": 40, "metric": 0.86},
        {"name": "lr-sweep-trial-01", "params": {"training.lr": 1e-6}, "state": "EarlyStopped", "step": 10, "total_steps": 40, "metric": 0.52},
        {"name": "lr-sweep-trial-02", "params": {"training.lr": 5e-5}, "state": "Running", "step": 20, "total_steps": 40, "metric": 0.7},
        {"name": "lr-sweep-trial-03", "params": {"training.lr": 1e-4}, "state": "Pending", "metric": None},
    ],
    "best_trial": {"name": "lr-sweep-trial-00", "params": {"training.lr": 3e-4}, "metric": 0.86},
}


@pytest.mark.unit
def test_sweep_status_lists_trials_and_the_best():
    sweep = parse_sweep(sweep_doc())
    rayjob = {"metadata": {"name": "lr-sweep-sweep"}, "status": {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}}
    st = build_sweep_status(sweep, Observed(rayjob, Progress.model_validate(PROGRESS)), None, 1_800_000_000.0).wire()
    assert (st["phase"], st["reason"], st["message"]) == ("Running", "Searching", "2 of 4 trials done")
    assert st["trialsDone"] == "2/4" and st["progress"] == {"percent": 50}
    assert [t["state"] for t in st["trials"]] == ["Succeeded", "EarlyStopped", "Running", "Pending"]
    assert st["trials"][1] == {"name": "lr-sweep-trial-01", "params": {"training.lr": 1e-6}, "state": "EarlyStopped",
                               "metric": 0.52, "step": 10, "totalSteps": 40}
    assert "metric" not in st["trials"][3] and st["bestTrial"]["name"] == "lr-sweep-trial-00"
    final = Progress.model_validate({**PROGRESS, "state": "Succeeded", "model_uri": "s3://ftj/runs/lr-sweep/best/model"})
    done = build_sweep_status(sweep, Observed({**rayjob, "status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}}, final),
                              st, 1_800_000_100.0).wire()
    assert done["phase"] == "Succeeded" and done["modelURI"] == "s3://ftj/runs/lr-sweep/best/model"


@pytest.mark.controlplane
@pytest.mark.parametrize("case, doc, field", [c[:3] for c in MALFORMED if c[3]], ids=[c[0] for c in MALFORMED if c[3]])
def test_the_apiserver_rejects_malformed_sweeps_too(controlplane, namespace, tmp_path, case, doc, field):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = kubectl(controlplane, "apply", "-n", namespace, "-f", str(path), check=False)
    assert result.returncode != 0, f"the apiserver accepted {case}"
    assert field.removeprefix("spec.").split(".")[0] in result.stderr, result.stderr


@pytest.mark.controlplane
@pytest.mark.timeout(600)
def test_a_sweep_gets_one_rayjob_and_its_status_follows_its_reports(controlplane, namespace, tmp_path):
    from test_operator import Operator, drive, ray_head, rayjob_of, report_of, until_status

    doc = sweep_doc()
    op = Operator(controlplane, tmp_path / "operator.log", "--namespace", namespace, "--no-leader-election")
    try:
        kubectl(controlplane, "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(doc))
        sweep = get(controlplane, namespace, "fts", "lr-sweep")
        rj = rayjob_of(controlplane, namespace, "lr-sweep-sweep")
        assert rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 2
        assert len(get(controlplane, namespace, "rayjobs")["items"]) == 1
        drive(controlplane, namespace, "lr-sweep-sweep", jobDeploymentStatus="Running", jobStatus="RUNNING", rayClusterName="lr-sweep-rc")
        token = ray_head(controlplane, namespace, "lr-sweep", "lr-sweep-rc", kind="sweep")
        assert op.report(token, report_of(sweep, Progress.model_validate(PROGRESS).wire()))[0] == 200
        # The RayJob's status event and the report race each other: wait for both to show.
        st = until_status(controlplane, namespace, "lr-sweep", "Running with trials in status",
                          lambda s: s.get("phase") == "Running" and len(s.get("trials", [])) == 4, kind="fts")
        assert st["bestTrial"]["metric"] == 0.86 and st["trialsDone"] == "2/4"
        table = kubectl(controlplane, "get", "fts", "-n", namespace).stdout.splitlines()
        assert table[0].split() == ["NAME", "PHASE", "TRIALS", "BEST", "METRIC", "AGE"]
        assert table[1].split()[:5] == ["lr-sweep", "Running", "2/4", "lr-sweep-trial-00", "0.86"]

        # A sweep is suspended by its own spec.suspend (the only field that may change).
        kubectl(controlplane, "patch", "fts", "lr-sweep", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')
        wait_for("the RayJob suspended", lambda: rayjob_of(controlplane, namespace, "lr-sweep-sweep")["spec"]["suspend"] is True)
        refused = kubectl(controlplane, "patch", "fts", "lr-sweep", "-n", namespace, "--type=merge", "-p", '{"spec":{"maxTrials":8}}', check=False)
        assert refused.returncode != 0 and "maxTrials is immutable" in refused.stderr
    finally:
        assert op.stop() == 0

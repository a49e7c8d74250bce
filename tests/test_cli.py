"""`finetune run` refuses bad inputs before it starts Ray, naming the field."""

import subprocess
import sys

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "patch, expected",
    [
        ({"dataset": {"train": "missing.jsonl"}}, "spec.dataset.train: no such file"),
        ({"model": {"source": "package:no-such-model-package"}}, "spec.model.source: package:no-such-model-package"),
        ({"model": {"source": "./models/absent"}}, "spec.model.source: "),
        ({"dataset": {"labelColumn": "stars"}}, "spec.dataset.train row 0: no column 'stars'"),
        ({"model": {"labels": ["good", "bad"]}}, "spec.dataset.train row 0: label 'positive' is not one of model.labels ['good', 'bad']"),
    ],
    ids=["dataset-file", "package", "local-model-dir", "label-column", "label-value"],
)
def test_run_rejects_missing_inputs_before_ray_starts(tmp_path, patch, expected):
    doc = yaml.safe_load((REPO / "examples/minilm-sentiment.yaml").read_text())
    doc["spec"]["dataset"]["train"] = str(REPO / "examples/data/sentiment.jsonl")
    for section, values in patch.items():
        doc["spec"][section].update(values)
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    proc = subprocess.run([sys.executable, "-m", "finetune_cli.main", "run", str(manifest), "--storage", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
    assert "ray" not in proc.stderr.lower() and not (tmp_path / "minilm-sentiment").exists()

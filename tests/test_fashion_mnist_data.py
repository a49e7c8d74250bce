"""examples/data/fashion_mnist.py: Fashion-MNIST's training IDX files (Debian package
dataset-fashion-mnist) as a deterministic folder of class folders of PNGs."""

import subprocess
import sys

import pytest
from PIL import Image

from conftest import REPO

pytestmark = pytest.mark.unit

SCRIPT = REPO / "examples/data/fashion_mnist.py"
CLASSES = {"t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_writes_a_balanced_deterministic_image_folder(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        proc = run("--train", "100", "--out", str(out))
        assert proc.returncode == 0, proc.stderr
    assert {p.name for p in first.iterdir()} == CLASSES
    for folder in first.iterdir():
        pngs = sorted(folder.glob("*.png"))
        assert len(pngs) == 10 and len(list(folder.iterdir())) == 10
        for png in pngs:
            with Image.open(png) as img:
                assert (img.format, img.mode, img.size) == ("PNG", "L", (28, 28))
            assert png.read_bytes() == (second / folder.name / png.name).read_bytes()
    proc = run("--train", "100", "--out", str(first))  # idempotent: nothing to do
    assert proc.returncode == 0 and "already there" in proc.stdout


def test_missing_source_names_the_file_and_the_package(tmp_path):
    proc = run("--train", "100", "--source", str(tmp_path / "none"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1
    assert "train-labels-idx1-ubyte" in proc.stderr and "apt-get install dataset-fashion-mnist" in proc.stderr
    assert not (tmp_path / "out").exists()

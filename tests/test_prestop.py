"""The Ray pods' preStop hook finds the training driver and Ray Train's workers, and only them."""

import subprocess
import sys
import time

import pytest

from finetune_train import prestop

pytestmark = pytest.mark.unit


def test_the_hook_finds_the_driver_and_nothing_else():
    sleep = "import time; time.sleep(60)"
    # argv as builders.entrypoint makes it (python -m finetune_train --job ...), and look-alikes.
    driver = subprocess.Popen([sys.executable, "-c", sleep, "-m", "finetune_train", "--job", "x"])
    others = [subprocess.Popen([sys.executable, "-c", sleep, "finetune_train"]),
              subprocess.Popen(["sh", "-c", "sleep 60; : -m finetune_train"])]
    try:
        found = prestop.drivers()
        assert driver.pid in found and not {p.pid for p in others} & set(found)
    finally:
        for p in (driver, *others):
            p.kill()
            p.wait()


def test_the_hook_finds_train_workers_by_their_process_title():
    # Ray titles each actor's process ray::<class>; exec -a sets argv[0] the same way.
    worker, other = (subprocess.Popen(["bash", "-c", f'exec -a "ray::{name}" sleep 60']) for name in ("RayTrainWorker", "IDLE"))
    try:
        assert wait_until(lambda: worker.pid in prestop.train_workers())
        assert other.pid not in prestop.train_workers()
    finally:
        for p in (worker, other):
            p.kill()
            p.wait()


def wait_until(ready, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.05)
    return ready()

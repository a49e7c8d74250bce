"""The preStop hook of every Ray pod (builders.py): `python -m finetune_train.prestop`.

Kubernetes stops a pod (suspend, drain, eviction) by SIGTERM to its PID 1, in KubeRay's pods
`ray start --block`, which then stops the node's Ray processes at once: the training driver on
the head never hears of it, and the training workers die before they can checkpoint. The
kubelet runs this hook first, and sends SIGTERM only once it returns. It passes SIGTERM on to a
training driver in the pod (launch.Preemption: every worker saves a checkpoint at the current
step and the run ends Preempted), then waits until the pod's driver and training workers have
exited. The pod's terminationGracePeriodSeconds (gracePeriodSeconds plus a margin) bounds it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENTRYPOINT = ("-m", "finetune_train")  # builders.entrypoint: python -m finetune_train --job|--sweep ...
TRAIN_WORKER = "ray::RayTrainWorker"  # the process title of Ray Train's worker actors


def _processes() -> dict[int, list[str]]:
    found = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                found[int(proc.name)] = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
    return found


def drivers() -> list[int]:
    """The pids of training drivers in this container."""
    return [pid for pid, argv in _processes().items()
            if "python" in Path(argv[0]).name and any(argv[i:i + 2] == list(ENTRYPOINT) for i in range(len(argv)))]


def train_workers() -> list[int]:
    return [pid for pid, argv in _processes().items() if argv[0].startswith(TRAIN_WORKER)]


def main() -> None:
    for pid in drivers():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    while drivers() or train_workers():
        time.sleep(0.5)


if __name__ == "__main__":
    main()

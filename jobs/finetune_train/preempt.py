"""Preemption: a run told to stop (SIGTERM to `finetune run`, `finetune sweep` or the RayJob
entrypoint) saves a checkpoint at the current step on every worker and ends, so the next
attempt of the same run loses nothing.

The request travels through one named Ray actor per run, or per sweep for all its trials;
each training worker waits on it in a background thread, and the ranks agree on the step to
stop at with one all-reduce.
"""

from __future__ import annotations

import asyncio
import threading

import ray
import torch
import torch.distributed as dist

NAMESPACE = "finetune"


@ray.remote(num_cpus=0)
class _Signal:
    def __init__(self):
        self._requested = asyncio.Event()
        self.reason = None

    async def request(self, reason: str) -> None:
        self.reason = reason
        self._requested.set()

    async def wait_requested(self) -> str:
        await self._requested.wait()
        return self.reason

    async def requested(self) -> bool:
        return self._requested.is_set()


def _name(run: str) -> str:
    return f"preempt-{run}"


def create(run: str):
    """The run's signal actor, made by the driver before training starts, on the driver's own
    node: placed on a worker node it died with that node, and a suspension after the loss
    reached no worker (the run went on to its end)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return _Signal.options(name=_name(run), namespace=NAMESPACE, get_if_exists=True, scheduling_strategy=here).remote()


def lookup(run: str):
    try:
        return ray.get_actor(_name(run), namespace=NAMESPACE)
    except ValueError:
        return None


def requested(run: str) -> bool:
    signal = lookup(run)
    return signal is not None and ray.get(signal.requested.remote())


class Watcher:
    """Worker side: `sync()` says stop on every rank at the same step once a stop is requested."""

    def __init__(self, run: str, device):
        self.device, self._local = device, threading.Event()
        self._signal = lookup(run)
        if self._signal is not None:
            threading.Thread(target=self._wait, daemon=True, name="preempt-watch").start()

    def _wait(self) -> None:
        ray.get(self._signal.wait_requested.remote())
        self._local.set()

    def sync(self, count: float) -> tuple[bool, float]:
        """(stop now, `count` summed over the ranks): one all-reduce per step serves both, the
        preemption check and the step's target count the loss is normalised by. Ranks see a
        stop request at different moments; the sum makes them all stop at the same step."""
        t = torch.tensor([float(self._local.is_set()), count], dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(t)
        stop, total = t.tolist()
        return stop > 0, total

"""Driver side of a FineTuneSweep: Ray Tune searches the template's fields, each trial one Ray
Train run of the ordinary training program, ASHA stops the trials that fall behind, and the
best trial's model is copied to `<root>/best/`.

Reads top to bottom: search space → trial (a FineTuneJob through launch.trainer_for) → what
a trial's Train run tells Tune → what the driver records (progress.json) and how it stops a
trial → the search → best trial, its model and the summary plot.

Everything of a sweep lives under `<storage>/<sweep run name>/`:
    progress.json            the sweep's state, every trial's, the best so far (the operator reads it)
    <sweep>-trial-NN/        one trial: Ray Train checkpoints, its own progress.json, output/
    best/                    the best trial's output/ (model/, metrics.json, loss.png) and sweep.png
    tune/                    Ray Tune's experiment state

How ASHA's stop reaches the Train run: a trial's Train controller forwards only evaluation
reports to Tune (TuneReportCallback, with an `evaluations` count ASHA's rungs are on) and
registers itself with the sweep's TrialBoard actor at its first report. When ASHA decides to
stop a trial, the driver sees that result (done=True, not exported) in `on_trial_result`,
before Tune acts on the decision, and aborts the trial's Train controller there and then:
the abort stops the workers and removes their placement group before `abort` returns. Only
then does Tune stop the trial actor and start the next trial. (Left to Tune alone, the trial
actor's death takes the controller and its workers with it but not their placement group,
which Ray Train removes only through the State API, i.e. never on a Ray without dashboard:
the next trial would wait for resources forever.)
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from finetune_api.spec import API_VERSION, FineTuneJob, ObjectMeta
from finetune_api.status import BestTrial, Progress, State, TrialRecord
from finetune_api.sweep import FineTuneSweep, SearchParam
from finetune_train import launch, preempt
from finetune_train.progress import HEARTBEAT_SECONDS, Reporter, Target, write_progress
from finetune_train.storage import RunPaths, Store, StorageError, join, normalize
from finetune_train.tracking import Tracker, flatten

log = logging.getLogger("finetune.sweep")

# What Tune reserves for a trial: the trial only drives its Train run, whose workers reserve
# their own resources (template.resources). No CPU, so that a 2-core machine can hold a
# 2-CPU worker; Tune needs some resource in a request, so a little memory.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 2**20}
EVALUATIONS = "evaluations"  # ASHA's time attribute: evaluations a trial has reported
POLL_SECONDS = 0.5  # how often the driver looks for new steps of running trials


# ---- search space


def param_space(search_space: dict[str, SearchParam]) -> dict[str, Any]:
    """Tune's distributions for the sweep's search space, keyed by the dotted field path."""
    space = {}
    for path, p in search_space.items():
        if p.type == "choice":
            space[path] = tune.choice(list(p.values))
        elif p.type == "uniform":
            space[path] = tune.uniform(p.low, p.high)
        elif p.type == "loguniform":
            space[path] = tune.loguniform(p.low, p.high)
        else:  # randint: an integer in [low, high), the values SearchParam.bounds() validated
            space[path] = tune.randint(math.ceil(p.low), math.ceil(p.high))
    return space


def sweep_root(sweep: FineTuneSweep, storage_uri: str | None = None) -> str:
    return join(normalize(storage_uri or sweep.spec.template.storage.uri), sweep.run_name)


def trial_name(sweep_name: str, trial_id: str) -> str:
    """<sweep>-trial-NN from Tune's trial id, which ends in the trial's number (`abc12_00003`)."""
    return f"{sweep_name}-trial-{int(trial_id.rsplit('_', 1)[-1]):02d}"


class _TrialNamer:
    def __init__(self, sweep_name: str):
        self.sweep_name = sweep_name

    def __call__(self, trial) -> str:
        return trial_name(self.sweep_name, trial.trial_id)


def _plain(value):
    """Sampled values as JSON and pydantic take them (Tune hands out numpy scalars)."""
    return value.item() if hasattr(value, "item") else value


def trial_job(sweep: FineTuneSweep, name: str, params: dict[str, Any]) -> FineTuneJob:
    meta = ObjectMeta(name=name, namespace=sweep.metadata.namespace)
    return FineTuneJob(apiVersion=API_VERSION, kind="FineTuneJob", metadata=meta, spec=sweep.spec.trial_spec(params))


# ---- what passes between a trial's Train run, the trial and the driver


@ray.remote(num_cpus=0)
class TrialBoard:
    """One per sweep, owned by the driver: Train controllers register themselves (so the
    driver can abort one) and post every step; trials post their failures."""

    def __init__(self):
        self.controllers, self.steps, self.errors, self.stopped = {}, {}, {}, set()

    def register(self, name: str, controller) -> None:
        self.controllers[name] = controller

    def step(self, name: str, step: int, total_steps: int) -> None:
        self.steps[name] = (step, total_steps)

    def fail(self, name: str, message: str) -> None:
        self.errors[name] = message

    def stop(self, name: str):
        """Mark a trial stopped by the sweep; its Train controller, for the driver to abort."""
        self.stopped.add(name)
        return self.controllers.get(name)

    def was_stopped(self, name: str) -> bool:
        return name in self.stopped

    def snapshot(self) -> tuple[dict, dict]:
        return self.steps, self.errors


class TrialReporter(TuneReportCallback):
    """Runs in a trial's Train controller after every report: posts the step to the board and
    forwards evaluations to Tune, numbered (ASHA's rungs count evaluations). The final
    evaluation goes to Tune only with the report that follows the export, so a trial ASHA
    stops at its last rung has its model in storage already."""

    def __init__(self, name: str, metric: str, board):
        super().__init__()  # in the trial's Tune session: opens the queue to the trial
        self.name, self.metric, self.board = name, metric, board
        self.evaluations, self.registered = 0, False

    def after_report(self, run_context, metrics, checkpoint):
        latest = metrics[0]
        if not self.registered:  # before any result reaches Tune, so a stop finds the controller
            ray.get(self.board.register.remote(self.name, ray.get_runtime_context().current_actor))
            self.registered = True
        self.board.step.remote(self.name, latest["step"], latest["total_steps"])
        # Step 0 is the evaluation before training: the same model in every trial, no rung.
        evaluation = self.metric in latest and not latest.get("preempted") and latest["step"] > 0
        if evaluation and (latest.get("exported") or latest["step"] < latest["total_steps"]):
            self.evaluations += 1
            super().after_report(run_context, [{**latest, EVALUATIONS: self.evaluations}], checkpoint)


class TrialFailed(RuntimeError):
    pass


def _trial_fn(sweep: FineTuneSweep, root: str, store: Store, metric: str, board, local: bool, parent: str | None):
    """The Tune function trainable: one trial = one FineTuneJob trained by Ray Train, tracked
    in a run nested in the sweep's (`parent`, its MLflow run id)."""

    def trial(config: dict) -> None:
        from ray.exceptions import RayActorError
        from ray.train import TrainingFailedError

        name = trial_name(sweep.name, tune.get_context().get_trial_id())
        params = {path: _plain(config[path]) for path in sweep.spec.search_space}
        if preempt.requested(sweep.run_name):
            return  # the sweep is stopping: this trial starts when the sweep runs again
        try:
            job = trial_job(sweep, name, params)
            paths = RunPaths(root, name, store)
            launch.check_same_run(job, paths)
            trainer = launch.trainer_for(job, paths, local=local, callbacks=[TrialReporter(name, metric, board)], signal=sweep.run_name,
                                         tracker=Tracker.open(job, paths, parent=parent))
            trainer.fit()
        except RayActorError:
            if ray.get(board.was_stopped.remote(name)):
                return  # the driver aborted this trial's Train run: ASHA stopped it
            raise
        except TrainingFailedError as err:
            message, _ = launch.failure(err, root)
            ray.get(board.fail.remote(name, message))
            raise TrialFailed(message) from None
        except Exception as err:
            ray.get(board.fail.remote(name, f"{type(err).__name__}: {err}"))
            raise

    return trial


# ---- what the driver records, and how it stops a trial


def _best(trials: list[TrialRecord], mode: str) -> BestTrial | None:
    """The best trial that finished (its metric is its final evaluation: like with like)."""
    done = [t for t in trials if t.state == State.SUCCEEDED and t.metric is not None]
    if not done:
        return None
    best = (max if mode == "max" else min)(done, key=lambda t: t.metric)
    return BestTrial(name=best.name, params=best.params, metric=best.metric)


class SweepTracker(tune.Callback):
    """Runs in the Tune driver loop: keeps every trial's state, step and metric, rewrites
    `<root>/progress.json` whenever one changes, and aborts the Train run of a trial ASHA
    stops before Tune goes on. A trial that ends unexported while the sweep is being preempted
    is Preempted: its checkpoint is where the next run of the sweep continues it."""

    def __init__(self, sweep: FineTuneSweep, root: str, store: Store, metric: str, board, reporter: Reporter | None = None):
        self.sweep, self.root, self.store, self.metric, self.board = sweep, root, store, metric, board
        self.reporter = reporter  # pushes the sweep's progress to the operator (Kubernetes)
        self.trials: dict[str, TrialRecord] = {}
        self.history: dict[str, list[tuple[int, float]]] = {}  # (step, metric) of every evaluation
        self.exported: set[str] = set()
        self.last_written: dict | None = None
        self.last_poll = 0.0

    # -- the progress document

    def progress(self, state: State = State.RUNNING, **extra) -> Progress:
        trials = [self.trials[n].model_copy() for n in sorted(self.trials)]
        return Progress(
            kind="sweep", state=state, updated=time.time(), max_trials=self.sweep.spec.max_trials, metric=self.metric,
            mode=self.sweep.spec.direction, trials=trials, best_trial=_best(trials, self.sweep.spec.direction), **extra,
        )

    def write(self, state: State = State.RUNNING, **extra) -> Progress:
        progress = self.progress(state, **extra)
        unchanged = progress.wire() | {"updated": None}
        if unchanged != self.last_written:
            try:
                write_progress(self.store, join(self.root, "progress.json"), progress)
                self.last_written = unchanged
            except StorageError as err:  # status lags behind; the sweep goes on
                log.warning("progress.json not written: %s", err)
            if self.reporter is not None:
                self.reporter.report(progress)
        return progress

    def _set(self, trial, **fields) -> TrialRecord:
        name = trial_name(self.sweep.name, trial.trial_id)
        entry = self.trials.setdefault(name, TrialRecord(
            name=name, params={p: _plain(trial.config.get(p)) for p in self.sweep.spec.search_space}))
        for key, value in fields.items():
            setattr(entry, key, value)
        return entry

    def _finish(self, name: str, state: State, error: str | None = None) -> None:
        """The trial's own progress.json ends in its final state, as a FineTuneJob's does, and
        so does its tracked run (early-stopped trials tagged)."""
        paths = RunPaths(self.root, name, self.store)
        tracker = Tracker.continued(self.sweep.spec.template.tracking, paths)
        if tracker is not None:
            tracker.close(state, tags={"finetune.early_stopped": str(state == State.EARLY_STOPPED).lower()}, register=False)
        launch.finish_progress(paths, state, error)

    # -- Tune's events

    def on_trial_add(self, iteration, trials, trial, **info):
        self._set(trial)
        self.write()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._set(trial, state=State.RUNNING)
        self.write()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        entry = self._set(trial, step=result["step"], total_steps=result["total_steps"], metric=result.get(self.metric))
        self.history.setdefault(entry.name, []).append((result["step"], result.get(self.metric)))
        if result.get("exported"):
            self.exported.add(entry.name)
        elif result.get("done"):  # the scheduler decided to stop this trial; Tune acts after this returns
            self._abort(entry.name)
            entry.state = State.EARLY_STOPPED
            self._finish(entry.name, State.EARLY_STOPPED)
        self.write()

    def on_trial_complete(self, iteration, trials, trial, **info):
        entry = self._set(trial)
        if entry.state != State.EARLY_STOPPED:
            if entry.name in self.exported:
                entry.state = State.SUCCEEDED
            elif preempt.requested(self.sweep.run_name):
                entry.state = State.PREEMPTED
            else:
                entry.state, entry.error = State.FAILED, "the trial ended without exporting a model"
            self._finish(entry.name, entry.state, entry.error)
        self.write()

    def on_trial_error(self, iteration, trials, trial, **info):
        entry = self._set(trial)
        _, errors = ray.get(self.board.snapshot.remote())
        entry.state, entry.error = State.FAILED, errors.get(entry.name) or _tune_error(trial)
        self._finish(entry.name, State.FAILED, entry.error)
        self.write()

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self.last_poll < POLL_SECONDS:
            return
        self.last_poll = now
        steps, _ = ray.get(self.board.snapshot.remote())
        for name, (step, total) in steps.items():
            entry = self.trials.get(name)
            if entry is not None and entry.state == State.RUNNING and step >= entry.step:
                entry.step, entry.total_steps = step, total
        self.write()

    def _abort(self, name: str) -> None:
        """Stop a trial's Train run now: the controller's abort stops its workers and removes
        their placement group, so the resources are free before the next trial starts."""
        from ray.exceptions import RayActorError

        controller = ray.get(self.board.stop.remote(name))
        if controller is None:
            return
        t0 = time.monotonic()
        try:
            ray.get(controller.abort.remote(), timeout=120)
        except RayActorError:
            pass  # abort ends with the controller exiting
        except ray.exceptions.GetTimeoutError:
            log.warning("%s: the Train run did not abort within 120 s; killing its controller", name)
            ray.kill(controller)
        log.info("%s: stopped early; its Train run was aborted in %.1fs", name, time.monotonic() - t0)


def _tune_error(trial) -> str:
    text = trial.get_error() or "failed"
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else "failed"


# ---- the search


def _evaluations_per_trial(sweep: FineTuneSweep) -> int | None:
    t = sweep.spec.template.training
    if t.max_steps is None or t.eval_every is None:
        return None
    return math.ceil(t.max_steps / t.eval_every)  # every evalEvery steps, and the final one


def scheduler_for(sweep: FineTuneSweep):
    s = sweep.spec.scheduler
    if s.type == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # Rungs at gracePeriod × reductionFactor^k evaluations, up to the evaluations a trial
    # makes; a trial that reaches the last one is never stopped for having reached it.
    max_t = max(_evaluations_per_trial(sweep) or 100, s.grace_period)
    return ASHAScheduler(
        time_attr=EVALUATIONS, grace_period=s.grace_period, reduction_factor=s.reduction_factor, max_t=max_t,
        stop_last_trials=False,
    )


def run_sweep(sweep: FineTuneSweep, storage_uri: str | None = None, local: bool = True, target: Target | None = None) -> Progress:
    """Run every trial of the sweep on the Ray this process is connected to; progress.json
    (also pushed to `target`, see progress.py) ends in Succeeded (with the best trial's model
    in <root>/best/), Preempted (SIGTERM: the running trials checkpointed and stopped, no new
    one started) or Failed; that final progress is returned."""
    from ray.tune.search import BasicVariantGenerator

    spec = sweep.spec
    root = sweep_root(sweep, storage_uri)
    store = Store.of(spec.template.storage)
    metric = spec.metric or "eval_loss"
    board = TrialBoard.remote()
    ray.get(board.snapshot.remote())  # started before Tune's loop asks it anything
    preemption = launch.Preemption(sweep.run_name, spec.template.checkpointing.grace_period_seconds)
    reporter = Reporter(target, heartbeat=HEARTBEAT_SECONDS) if target else None
    tracker = SweepTracker(sweep, root, store, metric, board, reporter)
    tracker.write()
    settings = {k: v for k, v in sweep.spec.wire().items() if k != "template"}
    tracking = Tracker.open(trial_job(sweep, sweep.name, {}), RunPaths(normalize(storage_uri or spec.template.storage.uri),
                            sweep.run_name, store), params=flatten(settings), output=join(root, "best"))
    fs, fs_root = store.filesystem(root)
    tuner = tune.Tuner(
        tune.with_resources(_trial_fn(sweep, root, store, metric, board, local, tracking and tracking.run_id), TRIAL_DRIVER_RESOURCES),
        param_space=param_space(spec.search_space),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=spec.direction,
            num_samples=spec.max_trials,
            # The same trials (names and sampled values) every time the sweep runs, so a
            # rerun continues each trial's Train run from its checkpoints.
            search_alg=BasicVariantGenerator(max_concurrent=spec.max_concurrent_trials, random_state=spec.template.training.seed),
            scheduler=scheduler_for(sweep),
            trial_name_creator=_TrialNamer(sweep.name),
            trial_dirname_creator=_TrialNamer(sweep.name),
        ),
        run_config=tune.RunConfig(
            name="tune", storage_path=fs_root, storage_filesystem=fs, callbacks=[tracker], verbose=0,
        ),
    )
    # Aborting an early-stopped trial's Train run holds Tune's loop for a second or two, by
    # design (see the module docstring); Tune would warn of a slow callback each time.
    slow_warnings = logging.getLogger("ray.tune.utils.util")
    level = slow_warnings.level
    slow_warnings.setLevel(logging.ERROR)
    final = None
    try:
        try:
            with preemption:
                tuner.fit()
        except KeyboardInterrupt:  # the grace period ran out
            if not preemption.requested:
                raise
        if preemption.requested:
            for t in tracker.trials.values():
                if t.state == State.RUNNING:  # the grace period ran out before its checkpoint
                    t.state = State.PREEMPTED
            final = tracker.write(State.PREEMPTED)
            return final
        best = tracker.progress().best_trial
        if best is None:
            errors = [f"{t.name}: {t.error}" for t in tracker.trials.values() if t.error]
            raise TrialFailed("no trial finished with a value of " + metric + ("; " + "; ".join(errors) if errors else ""))
        model_uri = export_best(sweep, root, store, best.name, tracker)
        final = tracker.write(State.SUCCEEDED, model_uri=model_uri)
        return final
    except (TrialFailed, StorageError, tune.TuneError) as err:
        final = tracker.write(State.FAILED, error=str(err) if isinstance(err, TrialFailed) else f"{type(err).__name__}: {err}")
        return final
    except BaseException as err:
        final = tracker.write(State.FAILED, error=f"{type(err).__name__}: {err}")
        raise
    finally:
        slow_warnings.setLevel(level)
        ray.kill(board)
        if tracking is not None and final is not None:
            best = final.best_trial
            if best is not None and best.metric is not None:
                tracking.log({"step": 0, f"best_{metric}": best.metric})
            tracking.close(final.state, tags={"finetune.best_trial": best.name} if best else {})
        if reporter is not None:
            reporter.close(final)


# ---- best trial, its model, the summary plot


def export_best(sweep: FineTuneSweep, root: str, store: Store, best: str, tracker: SweepTracker) -> str:
    """<root>/best/: the best trial's output/ (model/, metrics.json, loss.png) and sweep.png."""
    target = join(root, "best")
    store.delete_dir(target)  # a best/ of an earlier run of the sweep
    store.copy_dir(join(root, best, "output"), target)
    with tempfile.TemporaryDirectory() as tmp:
        plot_sweep(tracker, best, Path(tmp) / "sweep.png")
        store.upload_dir(tmp, target)
    return join(target, "model")


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def plot_sweep(tracker: SweepTracker, best: str, path: Path) -> None:
    """The metric at every evaluation of every trial; early-stopped trials dashed and marked
    where ASHA stopped them, the best trial bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for name in sorted(tracker.trials):
        t, points = tracker.trials[name], [(s, m) for s, m in tracker.history.get(name, []) if m is not None]
        if not points:
            continue
        steps, values = zip(*points)
        params = ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in t.params.items())
        label = f"{name.rsplit('-', 2)[-2]}-{name.rsplit('-', 1)[-1]} ({params}) {t.state}" + (" · best" if name == best else "")
        dashed = t.state == State.EARLY_STOPPED
        (line,) = ax.plot(steps, values, marker="o", linestyle="--" if dashed else "-", alpha=0.7 if dashed else 1.0,
                          linewidth=3 if name == best else 1.5, label=label)
        if dashed:
            ax.plot(steps[-1], values[-1], "X", markersize=12, color=line.get_color())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(tracker.metric)
    ax.set_title(f"{tracker.sweep.name}: {tracker.metric} per trial (X: stopped early by ASHA)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

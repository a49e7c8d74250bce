"""RayJob entrypoint: `python -m finetune_train --job <base64 JSON FineTuneJob>`, or
`--sweep <base64 JSON FineTuneSweep>` for a sweep (Ray Tune trials of its template).

The operator passes the validated object inline (base64, so no shell quoting can bend it);
this parses it back with the same models, checks the inputs as `finetune run` does (a problem
there ends the run Failed with reason InvalidInput before any worker starts, and the operator
retries nothing) and trains on the Ray cluster it runs in.
"""

from __future__ import annotations

import argparse
import sys

from finetune_api.spec import FineTuneJob, decode_job
from finetune_api.status import State
from finetune_api.sweep import FineTuneSweep, decode_sweep


def parse_args(argv: list[str]) -> FineTuneJob | FineTuneSweep:
    p = argparse.ArgumentParser(prog="python -m finetune_train")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--job", help="base64 JSON of the FineTuneJob (written by the operator)")
    what.add_argument("--sweep", help="base64 JSON of the FineTuneSweep (written by the operator)")
    args = p.parse_args(argv)
    return decode_job(args.job) if args.job is not None else decode_sweep(args.sweep)


def main(argv: list[str] | None = None) -> int:
    obj = parse_args(sys.argv[1:] if argv is None else argv)
    from finetune_train import launch
    from finetune_train.progress import Target
    from finetune_train.storage import RunPaths, Store, normalize, paths_for

    target = Target.of(obj)
    if isinstance(obj, FineTuneSweep):
        from finetune_train.sweep import run_sweep, trial_job

        template = obj.spec.template
        problems = launch.check_inputs(trial_job(obj, obj.name, {}), Store.of(template.storage))
        if problems:
            paths = RunPaths(normalize(template.storage.uri), obj.run_name, Store.of(template.storage))
            launch.refuse(paths, [p.replace("spec.", "spec.template.", 1) for p in problems], target)
            return 1
        launch.init_ray(address="auto")
        return 0 if run_sweep(obj, local=False, target=target).state == State.SUCCEEDED else 1
    paths = paths_for(obj)
    problems = launch.check_inputs(obj, paths.store)
    if not problems:
        try:
            launch.check_same_run(obj, paths)
        except launch.RunMismatch as err:
            problems = [str(err)]
    if problems:
        launch.refuse(paths, problems, target)
        return 1
    launch.init_ray(address="auto")
    return 0 if launch.run(obj, paths, local=False, target=target).state == State.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())

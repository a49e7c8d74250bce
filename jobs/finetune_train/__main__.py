"""RayJob entrypoint: `python -m finetune_train --job <base64 JSON FineTuneJob>`.

The operator passes the validated FineTuneJob inline (base64, so no shell quoting can bend
it); this parses it back with the same models and trains on the Ray cluster it runs in.
"""

from __future__ import annotations

import argparse
import sys

from finetune_api.spec import FineTuneJob, decode_job


def parse_args(argv: list[str]) -> FineTuneJob:
    p = argparse.ArgumentParser(prog="python -m finetune_train")
    p.add_argument("--job", required=True, help="base64 JSON of the FineTuneJob (written by the operator)")
    return decode_job(p.parse_args(argv).job)


def main(argv: list[str] | None = None) -> int:
    job = parse_args(sys.argv[1:] if argv is None else argv)
    from finetune_train import launch
    from finetune_train.storage import paths_for

    launch.init_ray(address="auto")
    return 0 if launch.run(job, paths_for(job), local=False).state == "Succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())

"""Checkpoint save throughput to S3: our path against a raw boto3 multipart upload.

    python bench/checkpoint_io.py [--size-mb 512] [--repeats 3] [--endpoint URL --bucket NAME]

Our path is what `ray.train.report(checkpoint=..., checkpoint_upload_fn=...)` runs on every
worker: `Store.checkpoint_uploader`, i.e. `Store.upload_dir` with the spec's S3 settings. The
baseline uploads the same files with boto3's `upload_file` (multipart, boto3's default
TransferConfig), one file after the other. For reference, Ray Train's default upload (pyarrow
`copy_files` through the same `Store.s3` filesystem) is measured too. The folder
looks like a ZeRO-2 checkpoint of two ranks: one model-state file and two optimizer-state files
of random bytes. Without --endpoint a moto server is started on loopback (AWS_* credentials are
set to dummies for it). The median of --repeats uploads counts on each side.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return proc, endpoint
        except OSError:
            time.sleep(0.2)
    raise SystemExit("moto server did not start")


def make_checkpoint(root: Path, size_mb: int) -> Path:
    """model states (1/4 of the bytes) + one optimizer-state file per rank (3/8 each)."""
    folder = root / "checkpoint_00000001" / "state"
    folder.mkdir(parents=True)
    for name, share in (("mp_rank_00_model_states.pt", 2), ("zero_pp_rank_0_mp_rank_00_optim_states.pt", 3),
                        ("zero_pp_rank_1_mp_rank_00_optim_states.pt", 3)):
        with open(folder / name, "wb") as f:
            for _ in range(size_mb * share // 8):
                f.write(os.urandom(1 << 20))
    return folder.parent


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--endpoint", help="an S3-compatible endpoint (default: a moto server on loopback)")
    p.add_argument("--bucket", default="bench")
    args = p.parse_args()

    from boto3.s3.transfer import TransferConfig
    from ray.train import Checkpoint
    from ray.train.v2._internal.execution.storage import _upload_to_fs_path

    from finetune_train.storage import Store

    server = None
    if args.endpoint is None:
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
        server, args.endpoint = start_moto()
    try:
        store = Store(endpoint=args.endpoint)
        store.client.create_bucket(Bucket=args.bucket)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = make_checkpoint(Path(tmp), args.size_mb)
            files = sorted(f for f in ckpt.rglob("*") if f.is_file())
            total_mb = sum(f.stat().st_size for f in files) / 2**20

            upload = store.checkpoint_uploader(f"s3://{args.bucket}/ours")

            def ours(i):
                upload(Checkpoint.from_directory(str(ckpt)), f"{i}/{ckpt.name}")

            def ray_default(i):
                _upload_to_fs_path(str(ckpt), store.s3, f"{args.bucket}/ray/{i}/{ckpt.name}")

            def boto3_multipart(i):
                for f in files:
                    key = f"boto3/{i}/{ckpt.name}/{f.relative_to(ckpt)}"
                    store.client.upload_file(str(f), args.bucket, key, Config=TransferConfig())

            sides = {"ours": ours, "boto3": boto3_multipart, "ray default": ray_default}
            times = {k: [] for k in sides}
            for i in range(args.repeats):  # interleaved, so drift in the server hits every side
                for name, fn in sides.items():
                    times[name].append(timed(lambda: fn(i)))
    finally:
        if server is not None:
            server.terminate()

    rate = {k: total_mb / statistics.median(v) for k, v in times.items()}
    print(f"checkpoint: {total_mb:.0f} MB in {len(files)} files, {args.repeats} uploads each, endpoint {args.endpoint}")
    for k in times:
        print(f"{k:>11}: {rate[k]:8.1f} MB/s  (runs: {', '.join(f'{total_mb / t:.1f}' for t in times[k])})")
    print(f"ratio ours / boto3 multipart: {rate['ours'] / rate['boto3']:.2f}")


if __name__ == "__main__":
    main()

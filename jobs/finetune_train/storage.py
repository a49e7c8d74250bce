"""Run storage: a local directory or an S3-compatible bucket, one code path.

`<storage>/<run>/` holds Ray Train's checkpoints, progress.json and output/. Ray Train and
our own small files go through a pyarrow filesystem; models and datasets on s3:// are fetched
with boto3 (multipart, concurrent) into a per-node cache keyed by ETag. Credentials come from
the standard AWS chain (environment variables, ~/.aws, instance roles) and are never passed
around, so they cannot end up in a pickled config, a log or an error message.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import BotoCoreError, ClientError

from finetune_api.spec import FineTuneJob, StorageSpec

DEFAULT_LOCAL_STORAGE = Path.home() / ".cache" / "finetune" / "runs"
CACHE = Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune"))


class StorageError(OSError):
    """Storage that cannot be read or written; the message names the URI, never credentials.
    `permanent`: the store refused (no such bucket, credentials refused), which no retry cures."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


# S3 error codes that mean the spec or its Secret is wrong, not that storage is unwell.
PERMANENT_ERRORS = ("NoSuchBucket", "InvalidBucketName", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")


def is_s3(uri: str | None) -> bool:
    return bool(uri) and uri.startswith("s3://")


def normalize(uri: str | None) -> str:
    """A storage URI Ray Train and pyarrow accept: remote URIs as they are, local paths absolute."""
    if not uri:
        return str(DEFAULT_LOCAL_STORAGE)
    if "://" in uri and not uri.startswith("file://"):
        return uri.rstrip("/")
    return str(Path(uri.removeprefix("file://")).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


@dataclass(frozen=True)
class RunPaths:
    """Where a run keeps everything: <storage>/<run name>/ holds the checkpoints, spec.json,
    progress.json (read by `finetune run` and the operator) and output/."""

    storage: str  # normalized storage root
    name: str  # the run name: the folder of the run in storage
    store: Store

    @property
    def run(self) -> str:
        return join(self.storage, self.name)

    @property
    def progress(self) -> str:
        return join(self.run, "progress.json")

    @property
    def output(self) -> str:
        return join(self.run, "output")


def paths_for(job: FineTuneJob, storage_uri: str | None = None) -> RunPaths:
    return RunPaths(normalize(storage_uri or job.spec.storage.uri), job.run_name, Store.of(job.spec.storage))


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


@dataclass(frozen=True)
class Store:
    """The S3 settings of a spec (endpoint, region, addressing, timeouts, retries). Credentials
    come from the standard AWS chain (on Kubernetes: the Secret's keys as AWS_* variables) and
    are never printed."""

    endpoint: str | None = None
    region: str | None = None
    path_style: bool | None = None
    timeout_seconds: int = 30
    max_attempts: int = 8

    @classmethod
    def of(cls, spec: StorageSpec) -> Store:
        return cls(spec.endpoint, spec.region, spec.path_style, spec.timeout_seconds, spec.max_attempts)

    def __getstate__(self):
        # Only the settings travel to other processes (not the cached clients); each makes its own.
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def _path_style(self) -> bool:
        # MinIO and most S3-compatible stores serve path-style only; AWS prefers virtual hosts.
        return self.path_style if self.path_style is not None else self.endpoint is not None

    @cached_property
    def s3(self) -> pafs.S3FileSystem:
        endpoint = urlsplit(self.endpoint) if self.endpoint else None
        return pafs.S3FileSystem(
            endpoint_override=endpoint.netloc if endpoint else None,
            scheme=endpoint.scheme if endpoint else "https",
            region=self.region or ("us-east-1" if endpoint else None),
            force_virtual_addressing=not self._path_style,
            connect_timeout=self.timeout_seconds,
            request_timeout=self.timeout_seconds,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=self.max_attempts),
        )

    @cached_property
    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region or ("us-east-1" if self.endpoint else None),
            config=Config(
                connect_timeout=self.timeout_seconds,
                read_timeout=self.timeout_seconds,
                retries={"mode": "standard", "max_attempts": self.max_attempts},
                s3={"addressing_style": "path" if self._path_style else "virtual"},
            ),
        )

    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """(filesystem, path on it) for a storage URI, as Ray Train's RunConfig takes them."""
        if is_s3(uri):
            return self.s3, uri.removeprefix("s3://")
        return pafs.LocalFileSystem(), normalize(uri)

    # ---- small files and folders of a run

    def write_json(self, uri: str, obj) -> None:
        """Readers never see a half-written file: local writes rename a temporary file into
        place, and an S3 PUT is atomic by itself."""
        fs, path = self.filesystem(uri)
        data = json.dumps(obj, indent=2, sort_keys=True).encode()
        with _named(uri):
            if isinstance(fs, pafs.LocalFileSystem):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.{uuid.uuid4().hex}.tmp"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
                return
            with fs.open_output_stream(path) as f:
                f.write(data)

    def read_json(self, uri: str):
        """The parsed file, or None when it does not exist. On S3 one GET reads it whole: a
        ranged reader could mix two versions of a file that is being replaced."""
        with _named(uri):
            if is_s3(uri):
                bucket, key = split_s3(uri)
                try:
                    return json.loads(self.client.get_object(Bucket=bucket, Key=key)["Body"].read())
                except ClientError as err:
                    if err.response["Error"]["Code"] in ("NoSuchKey", "404"):
                        return None
                    raise
            fs, path = self.filesystem(uri)
            if fs.get_file_info(path).type == pafs.FileType.NotFound:
                return None
            with fs.open_input_stream(path) as f:
                return json.loads(f.read())

    def copy_dir(self, src_uri: str, dst_uri: str) -> None:
        (src_fs, src), (dst_fs, dst) = self.filesystem(src_uri), self.filesystem(dst_uri)
        with _named(dst_uri if is_s3(dst_uri) else src_uri):
            if isinstance(dst_fs, pafs.LocalFileSystem):
                os.makedirs(dst, exist_ok=True)
            pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)

    def upload_dir(self, local: str, uri: str) -> None:
        """A local folder into storage; on S3 with boto3, several files at once and each in
        concurrent multipart chunks (bench/checkpoint_io.py: pyarrow's copy, file after file,
        reached less than half of this)."""
        if not is_s3(uri):
            return self.copy_dir(local, uri)
        from boto3.s3.transfer import TransferConfig

        bucket, prefix = split_s3(uri)
        files = [f for f in Path(local).rglob("*") if f.is_file()]
        transfer = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=16 << 20, max_concurrency=8)

        def upload(f: Path) -> None:
            self.client.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(local).as_posix()}", Config=transfer)

        with _named(uri), ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(upload, files))

    def checkpoint_uploader(self, run_uri: str):
        """A `checkpoint_upload_fn` for ray.train.report that writes checkpoints where Ray Train
        would, through upload_dir; None (Ray's own copy) for local storage."""
        if not is_s3(run_uri):
            return None

        def upload(checkpoint, dir_name: str):
            from ray.train import Checkpoint

            uri = join(run_uri, dir_name)
            self.upload_dir(checkpoint.path, uri)
            return Checkpoint(path=uri.removeprefix("s3://"), filesystem=self.s3)

        return upload

    def delete_dir(self, uri: str) -> None:
        fs, path = self.filesystem(uri)
        with _named(uri):
            if fs.get_file_info(path).type != pafs.FileType.NotFound:
                fs.delete_dir(path)

    # ---- inputs (models, datasets) on s3://

    def _objects(self, uri: str) -> list[tuple[str, str, int]]:
        """(key, etag, size) of the object `uri` names, or of every object under it as a folder."""
        bucket, key = split_s3(uri)
        with _named(uri):
            try:
                head = self.client.head_object(Bucket=bucket, Key=key)
                return [(key, head["ETag"], head["ContentLength"])]
            except ClientError as err:
                if err.response["Error"]["Code"] not in ("404", "NoSuchKey", "NotFound") or not key:
                    raise
            prefix = key.rstrip("/") + "/"
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            # Keys ending in / are folder markers (pyarrow writes them), not files.
            return [(o["Key"], o["ETag"], o["Size"]) for page in pages for o in page.get("Contents", ()) if not o["Key"].endswith("/")]

    def exists(self, uri: str) -> bool:
        """An object or a folder with objects under it (a file or folder, locally)."""
        return bool(self._objects(uri)) if is_s3(uri) else Path(uri).exists()

    def local_copy(self, uri: str) -> str:
        """A local path for an input: s3:// objects and folders are downloaded once per node
        into a cache folder named by their ETags (a changed object is fetched again); any
        other value passes through unchanged."""
        if not is_s3(uri):
            return uri
        objects = self._objects(uri)
        if not objects:
            raise StorageError(f"{uri}: no such object or folder")
        bucket, key = split_s3(uri)
        single = objects[0][0] == key
        digest = hashlib.sha256(json.dumps([self.endpoint, bucket, sorted(objects)]).encode()).hexdigest()[:20]
        out = CACHE / "s3" / digest
        target = out / Path(key).name if single else out
        from boto3.s3.transfer import TransferConfig

        transfer = TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20, max_concurrency=8)

        def download(tmp: Path) -> None:
            def one(obj):
                rel = Path(obj[0]).name if single else Path(obj[0][len(key.rstrip("/")) + 1 :])
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                self.client.download_file(bucket, obj[0], str(tmp / rel), Config=transfer)

            try:
                with ThreadPoolExecutor(max_workers=4) as pool:
                    list(pool.map(one, objects))
            except Exception as err:
                raise StorageError(f"{uri}: download failed: {_reason(err)}") from None

        build_once(out, download)
        return str(target)


@contextmanager
def checkpoint_directory(checkpoint):
    """A Ray Train checkpoint as a local folder. A remote one is downloaded by each process
    into a folder of its own: Ray's as_directory() shares one download per node, but a rank
    that asks after the first finished downloads again, in place, while the first reads it
    (seen as a torn .pt file on resume)."""
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield checkpoint.path
        return
    with tempfile.TemporaryDirectory(prefix="finetune-checkpoint-") as tmp:
        yield checkpoint.to_directory(tmp)


def build_once(out: Path, build: Callable[[Path], None]) -> None:
    """Fill the cache folder `out` once per node, however many processes ask. `build` writes a
    fresh temporary folder that is renamed into place only when complete, so a killed or failed
    build never leaves a folder a later run would take for complete."""
    if out.exists():
        return
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{out}.lock"):
        if out.exists():
            return
        for stale in out.parent.glob(f"{out.name}.*.tmp"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.parent / f"{out.name}.{uuid.uuid4().hex}.tmp"
        try:
            build(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        tmp.rename(out)


def _reason(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


@contextmanager
def _named(uri: str):
    """Turn a storage library's error into a StorageError that names the URI."""
    try:
        yield
    except (StorageError, FileNotFoundError):
        raise
    except (OSError, BotoCoreError, ClientError, S3UploadFailedError) as err:
        code = err.response.get("Error", {}).get("Code") if isinstance(err, ClientError) else None
        raise StorageError(f"{uri}: {_reason(err)}", permanent=code in PERMANENT_ERRORS) from None

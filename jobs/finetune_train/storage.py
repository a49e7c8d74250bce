"""Run storage through pyarrow filesystems, so a local directory and an S3 bucket are one
code path: <storage>/<job>/ holds Ray Train's checkpoints, progress.json and output/."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pyarrow.fs as pafs

DEFAULT_LOCAL_STORAGE = Path.home() / ".cache" / "finetune" / "runs"


def normalize(uri: str | None) -> str:
    """A storage URI Ray Train and pyarrow accept: remote URIs as they are, local paths absolute."""
    if not uri:
        return str(DEFAULT_LOCAL_STORAGE)
    if "://" in uri and not uri.startswith("file://"):
        return uri.rstrip("/")
    return str(Path(uri.removeprefix("file://")).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(uri)


def write_json(uri: str, obj) -> None:
    """Readers never see a half-written file: local writes rename a temporary file into
    place, and an S3 PUT is atomic by itself."""
    fs, path = _resolve(uri)
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_json(uri: str):
    """The parsed file, or None when it does not exist."""
    fs, path = _resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def copy_dir(src_uri: str, dst_uri: str) -> None:
    src_fs, src = _resolve(src_uri)
    dst_fs, dst = _resolve(dst_uri)
    if isinstance(dst_fs, pafs.LocalFileSystem):
        os.makedirs(dst, exist_ok=True)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)


def delete_dir(uri: str) -> None:
    fs, path = _resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)

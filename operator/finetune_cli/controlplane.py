"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager
(garbage collection) and KubeRay's operator, for tests and `finetune cluster up`.

Modelled on controller-runtime's envtest (pkg/internal/testing/controlplane): a CA, a
serving certificate for 127.0.0.1/localhost, a service-account signing key, client
certificates in system:masters, RBAC authorization, free loopback ports, and all state
(certificates, etcd data, kubeconfigs, logs, pids) under one state directory. There is no
kubelet: pods stay Pending, which is enough to test what the API server and the operators do.

The binaries are built from Go modules by infra/build-controlplane.sh into a cache outside
the repo (`build_binaries`). The processes run in their own sessions, so they outlive the
process that started them; `ControlPlane.attach(state_dir)` finds them again from
state.json, for `finetune cluster down`.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import yaml

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "infra" / "build-controlplane.sh"
# KubeRay's CRDs as the chart installs them (read-only, beside the repo).
SHARED_KUBERAY_CRDS = REPO.parent / "shared" / "kuberay-crds"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kuberay-operator")
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
# kube-controller-manager runs only what a cluster without nodes needs: owner references
# (garbage collection), namespace deletion and default service accounts.
CONTROLLERS = "garbage-collector-controller,namespace-controller,serviceaccount-controller"
DEFAULT_STATE_DIR = Path(
    os.environ.get("FINETUNE_CLUSTER_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune" / "cluster"
)


class ControlPlaneError(RuntimeError):
    pass


def build_binaries(log: Any = None) -> Path:
    """The bin dir holding BINARIES, built by infra/build-controlplane.sh when missing or
    stale (a no-op taking well under a second when they are up to date). The environment
    variable FINETUNE_CONTROLPLANE_BIN names a ready bin dir instead."""
    if os.environ.get("FINETUNE_CONTROLPLANE_BIN"):
        return Path(os.environ["FINETUNE_CONTROLPLANE_BIN"])
    if not BUILD_SCRIPT.exists():
        raise ControlPlaneError(f"{BUILD_SCRIPT} not found; set FINETUNE_CONTROLPLANE_BIN to a bin dir with {', '.join(BINARIES)}")
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=log, text=True)
    if result.returncode != 0:
        raise ControlPlaneError(f"{BUILD_SCRIPT} failed with exit code {result.returncode}")
    return Path(result.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- certificates -------------------------------------------------------------------


def _pki(directory: Path) -> None:
    """CA, API server serving cert, service-account key pair and one client cert per
    component, as PEM files in directory."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def write_key(name: str, key) -> None:
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        (directory / name).write_bytes(pem)
        (directory / name).chmod(0o600)

    def issue(name: str, subject: list, issuer_key, issuer_name, *, ca=False, usage=(), sans=()):
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(issuer_name or x509.Name(subject))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_encipherment=not ca, content_commitment=False, data_encipherment=False,
                    key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
        )
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(usage)), critical=False)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        (directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(f"{name}.key", key)
        return key, cert

    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = issue("ca", [x509.NameAttribute(NameOID.COMMON_NAME, "finetune-controlplane-ca")], None, None, ca=True)
    service_ip = next(ipaddress.ip_network(SERVICE_CLUSTER_IP_RANGE).hosts())
    issue(
        "serving",
        [x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")],
        ca_key,
        ca_cert.subject,
        usage=[ExtendedKeyUsageOID.SERVER_AUTH],
        sans=[
            x509.DNSName("localhost"),
            x509.DNSName("kubernetes.default.svc"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(service_ip),
        ],
    )
    for user in ("admin", "kube-controller-manager", "kuberay-operator"):
        issue(
            user,
            [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"), x509.NameAttribute(NameOID.COMMON_NAME, user)],
            ca_key,
            ca_cert.subject,
            usage=[ExtendedKeyUsageOID.CLIENT_AUTH],
        )
    sa_key = ec.generate_private_key(ec.SECP256R1())
    write_key("sa.key", sa_key)
    (directory / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _kubeconfig(path: Path, server: str, pki: Path, user: str) -> None:
    import base64

    def data(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "finetune", "cluster": {"server": server, "certificate-authority-data": data("ca.crt")}}],
        "users": [{"name": user, "user": {"client-certificate-data": data(f"{user}.crt"), "client-key-data": data(f"{user}.key")}}],
        "contexts": [{"name": "finetune", "context": {"cluster": "finetune", "user": user, "namespace": "default"}}],
        "current-context": "finetune",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)


def load_yaml(path: Path) -> list[dict]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the KubeRay CRDs are megabytes
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=loader) if d]


# --- the control plane ---------------------------------------------------------------


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + KubeRay operator on loopback.

    `up(state_dir)` starts them, waits until each is ready, installs the FineTuneJob and
    KubeRay CRDs and waits until they are Established; `kubeconfig` is then an admin
    (system:masters) kubeconfig. `down()` stops them. Logs: state_dir/<binary>.log.
    """

    def __init__(self, bin_dir: Path | str | None = None, timeout: float = 120.0, kuberay_namespaces: tuple[str, ...] = ()):
        self.bin_dir = Path(bin_dir) if bin_dir else None
        self.timeout = timeout
        self.kuberay_namespaces = kuberay_namespaces  # empty: KubeRay acts in every namespace
        self.state_dir: Path | None = None
        self.ports: dict[str, int] = {}
        self.pids: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen] = {}

    # paths and addresses

    @property
    def kubeconfig(self) -> Path:
        return self._dir / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def _dir(self) -> Path:
        if self.state_dir is None:
            raise ControlPlaneError("the control plane is not up")
        return self.state_dir

    def _bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    # lifecycle

    def up(self, state_dir: Path | str) -> ControlPlane:
        self.state_dir = Path(state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.bin_dir is None:
            self.bin_dir = build_binaries()
        missing = [b for b in BINARIES if not (self.bin_dir / b).exists()]
        if missing:
            raise ControlPlaneError(f"{self.bin_dir} lacks {', '.join(missing)}: run infra/build-controlplane.sh")
        names = ("etcd", "etcd-peer", "apiserver", "kcm", "kuberay-metrics", "kuberay-probe")
        self.ports = {name: free_port() for name in names}
        pki = self._dir / "pki"
        _pki(pki)
        try:
            self._start_etcd()
            self._start_apiserver(pki)
            _kubeconfig(self.kubeconfig, self.server, pki, "admin")
            self.install_crds()
            self._start_controller_manager(pki)
            self._start_kuberay(pki)
        except BaseException:
            self.down()
            raise
        return self

    def _start_etcd(self) -> None:
        client, peer = f"http://127.0.0.1:{self.ports['etcd']}", f"http://127.0.0.1:{self.ports['etcd-peer']}"
        self._spawn(
            "etcd",
            [
                self._bin("etcd"),
                "--name=default",
                f"--data-dir={self._dir / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=default={peer}",
                "--unsafe-no-fsync=true",  # throwaway data: as envtest does
            ],
        )
        self._wait("etcd", lambda: json.loads(self._http(f"{client}/health")).get("health") == "true")

    def _start_apiserver(self, pki: Path) -> None:
        port = self.ports["apiserver"]
        self._spawn(
            "kube-apiserver",
            [
                self._bin("kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
                f"--secure-port={port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--cert-dir={self._dir / 'apiserver'}",
                f"--tls-cert-file={pki / 'serving.crt'}",
                f"--tls-private-key-file={pki / 'serving.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--service-account-issuer=https://127.0.0.1:{port}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--authorization-mode=RBAC",
                # No token controller mints tokens here, as in envtest.
                "--disable-admission-plugins=ServiceAccount",
                "--allow-privileged=true",
            ],
        )
        self._wait("kube-apiserver", lambda: self._http(f"{self.server}/readyz", pki=pki) == "ok")

    def _start_controller_manager(self, pki: Path) -> None:
        kubeconfig = self._dir / "kube-controller-manager.kubeconfig"
        _kubeconfig(kubeconfig, self.server, pki, "kube-controller-manager")
        port = self.ports["kcm"]
        self._spawn(
            "kube-controller-manager",
            [
                self._bin("kube-controller-manager"),
                f"--kubeconfig={kubeconfig}",
                f"--controllers={CONTROLLERS}",
                "--leader-elect=false",
                f"--secure-port={port}",
                "--bind-address=127.0.0.1",
                f"--cert-dir={self._dir / 'kube-controller-manager'}",
                f"--tls-cert-file={pki / 'serving.crt'}",
                f"--tls-private-key-file={pki / 'serving.key'}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            ],
        )
        self._wait("kube-controller-manager", lambda: self._http(f"https://127.0.0.1:{port}/healthz", pki=pki) == "ok")

    def _start_kuberay(self, pki: Path) -> None:
        kubeconfig = self._dir / "kuberay-operator.kubeconfig"
        _kubeconfig(kubeconfig, self.server, pki, "kuberay-operator")
        probe = self.ports["kuberay-probe"]
        self._spawn(
            "kuberay-operator",
            [
                self._bin("kuberay-operator"),
                f"--kubeconfig={kubeconfig}",
                f"--metrics-addr=127.0.0.1:{self.ports['kuberay-metrics']}",
                f"--health-probe-bind-address=127.0.0.1:{probe}",
                "--enable-leader-election=false",
                "--log-stdout-encoder=console",
                *([f"--watch-namespace={','.join(self.kuberay_namespaces)}"] if self.kuberay_namespaces else []),
            ],
            env={"KUBECONFIG": str(kubeconfig)},
        )
        self._wait("kuberay-operator", lambda: self._http(f"http://127.0.0.1:{probe}/readyz") == "ok")

    def down(self, remove_state: bool = False) -> None:
        """Stops every process (SIGTERM, then SIGKILL after 15 s); with remove_state, also
        deletes the state dir."""
        for name in reversed(list(self.pids)):
            _stop(self.pids[name], self._procs.get(name), self._bin(name) if self.bin_dir else None)
        self.pids.clear()
        self._procs.clear()
        if self.state_dir is not None:
            (self.state_dir / "state.json").unlink(missing_ok=True)
            if remove_state:
                import shutil

                shutil.rmtree(self.state_dir, ignore_errors=True)

    @classmethod
    def attach(cls, state_dir: Path | str) -> ControlPlane | None:
        """The control plane whose state.json is in state_dir, if any of it is running."""
        path = Path(state_dir) / "state.json"
        if not path.exists():
            return None
        state = json.loads(path.read_text())
        plane = cls(bin_dir=state["bin_dir"])
        plane.state_dir, plane.ports, plane.pids = Path(state_dir).resolve(), state["ports"], state["pids"]
        return plane

    def running(self) -> bool:
        """Whether every process is alive."""
        return bool(self.pids) and all(_alive(pid, self._bin(name)) for name, pid in self.pids.items())

    # processes

    def _spawn(self, name: str, argv: list[str], env: dict | None = None) -> None:
        log = open(self._dir / f"{name}.log", "ab")
        try:
            proc = subprocess.Popen(
                argv,
                cwd=self._dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # outlives `finetune cluster up`; no terminal signals
            )
        finally:
            log.close()
        self._procs[name], self.pids[name] = proc, proc.pid
        state = {"bin_dir": str(self.bin_dir), "ports": self.ports, "pids": self.pids, "kubeconfig": str(self.kubeconfig)}
        (self._dir / "state.json").write_text(json.dumps(state, indent=2))

    def _wait(self, name: str, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.timeout
        error: Exception | None = None
        while time.monotonic() < deadline:
            proc = self._procs[name]
            if proc.poll() is not None:
                raise ControlPlaneError(f"{name} exited with code {proc.returncode}:\n{self.log_tail(name)}")
            try:
                if ready():
                    return
            except (OSError, ValueError, urllib.error.URLError) as err:
                error = err
            time.sleep(0.2)
        raise ControlPlaneError(f"{name} not ready after {self.timeout:.0f}s ({error}):\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self._dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"

    # HTTP against the API server, with the admin certificate

    def _ssl(self, pki: Path) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        return ctx

    def _http(self, url: str, pki: Path | None = None, method: str = "GET", body: Any = None) -> str:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        context = self._ssl(pki) if pki else None
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            return response.read().decode()

    def api(self, method: str, path: str, body: Any = None) -> dict:
        """One API request as admin; HTTP errors raise urllib.error.HTTPError."""
        return json.loads(self._http(self.server + path, pki=self._dir / "pki", method=method, body=body))

    # CRDs

    def crd_documents(self) -> list[dict]:
        """Our CRDs (from the models, as the chart has them) and KubeRay's: RayJob and
        RayCluster from shared/kuberay-crds, the operator's other kinds (it watches them
        all) from the same release as the operator binary."""
        from finetune_api.crd import KINDS, crd

        docs = [crd(kind) for kind in KINDS]
        kuberay = {}
        for folder in (self.bin_dir.parent / "kuberay-crds", SHARED_KUBERAY_CRDS):  # shared wins
            for path in sorted(folder.glob("ray.io_*.yaml")) if folder.is_dir() else ():
                kuberay[path.name] = path
        if "ray.io_rayjobs.yaml" not in kuberay:
            raise ControlPlaneError(f"KubeRay CRDs not found in {SHARED_KUBERAY_CRDS}")
        for path in kuberay.values():
            docs.extend(load_yaml(path))
        return docs

    def install_crds(self, docs: list[dict] | None = None) -> None:
        """Creates (or replaces) each CRD, then waits until all are Established."""
        base = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        docs = self.crd_documents() if docs is None else docs
        for doc in docs:
            name = doc["metadata"]["name"]
            try:
                self.api("POST", base, doc)
            except urllib.error.HTTPError as err:
                if err.code != 409:
                    raise ControlPlaneError(f"creating CRD {name}: {err.code} {err.read().decode()[:2000]}") from None
                current = self.api("GET", f"{base}/{name}")
                doc = {**doc, "metadata": {**doc["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]}}
                self.api("PUT", f"{base}/{name}", doc)

        def established(name: str) -> bool:
            conditions = (self.api("GET", f"{base}/{name}").get("status") or {}).get("conditions") or []
            return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

        deadline = time.monotonic() + self.timeout
        pending = [d["metadata"]["name"] for d in docs]
        while pending:
            pending = [n for n in pending if not established(n)]
            if pending and time.monotonic() > deadline:
                raise ControlPlaneError(f"CRDs not Established after {self.timeout:.0f}s: {', '.join(pending)}")
            if pending:
                time.sleep(0.2)


def _alive(pid: int, binary: str | None) -> bool:
    """Whether pid is running `binary` (not a recycled pid of something else)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return status != "Z" and (binary is None or cmdline == binary)


def _stop(pid: int, proc: subprocess.Popen | None, binary: str | None, grace: float = 15.0) -> None:
    if proc is None and not _alive(pid, binary):
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                return
            if proc is None and not _alive(pid, binary):
                return
            time.sleep(0.1)
    if proc is not None:
        proc.wait(timeout=5)

"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager
(garbage collection) and KubeRay's operator, for tests and `finetune cluster up`; with
`node=True` also a real node (node.py) and the apiserver on the node's address; with
`kueue=True` also Kueue, queueing RayJobs.

Modelled on controller-runtime's envtest (pkg/internal/testing/controlplane): a CA, a
serving certificate for 127.0.0.1/localhost, a service-account signing key, client
certificates in system:masters, RBAC authorization, free loopback ports, and all state
(certificates, etcd data, kubeconfigs, logs, pids) under one state directory. Without a node
there is no kubelet: pods stay Pending, which is enough to test what the API server and the
operators do. A node adds Node,RBAC authorization, NodeRestriction and ServiceAccount admission (projected
tokens), kubelet certificates, kube-scheduler and the controllers that running pods need.

The binaries are built from Go modules by infra/build-controlplane.sh into a cache outside
the repo (`build_binaries`). The processes run in their own sessions, so they outlive the
process that started them; `ControlPlane.attach(state_dir)` finds them again from
state.json, for `finetune cluster down`.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import shutil
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

from finetune_cli import images
from finetune_cli import node as nodes
from finetune_cli.node import CLUSTER_DOMAIN, NODE_IP, NODE_NAME

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "infra" / "build-controlplane.sh"
# KubeRay's CRDs as the chart installs them (read-only, beside the repo).
SHARED_KUBERAY_CRDS = REPO.parent / "shared" / "kuberay-crds"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kuberay-operator")
NODE_BINARIES = ("kube-scheduler", "kubelet", "kube-proxy", "coredns")
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
# kube-controller-manager runs only what a cluster without nodes needs: owner references
# (garbage collection), namespace deletion and default service accounts.
CONTROLLERS = "garbage-collector-controller,namespace-controller,serviceaccount-controller"
# ... and with a node, what running pods need: the not-ready taint lifted, Jobs (KubeRay's
# submitter, Helm hooks), Deployments, Service endpoints, the CA ConfigMap in-cluster clients
# read, finished-Job and orphaned-pod cleanup.
NODE_CONTROLLERS = CONTROLLERS + "," + ",".join(f"{c}-controller" for c in (
    "node-lifecycle", "taint-eviction", "job", "deployment", "replicaset", "endpointslice", "endpoints",
    "root-ca-certificate-publisher", "ttl-after-finished", "pod-garbage-collector",
))
# Client certificates of the node's components (all in system:masters, like the others here,
# but the kubelet's own); "kubelet-client" is the apiserver's, for logs and exec.
NODE_USERS = ("kube-scheduler", "kube-proxy", "coredns", "kubelet-client")
KUEUE_NAMESPACE = "kueue-system"
KUEUE_WEBHOOK_SECRET = "kueue-webhook-server-cert"  # Kueue's default name
# The CRDs that Kueue's release patches to convert their versions through its webhook
# (config/components/crd/patches); its certificate rotator injects its CA into each.
KUEUE_CONVERTED_CRDS = ("localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters")
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune"
DEFAULT_STATE_DIR = Path(os.environ.get("FINETUNE_CLUSTER_DIR") or CACHE / "cluster")
# containerd's root: imported images, kept across `cluster down` (a cache keyed by digest).
DEFAULT_IMAGE_STORE = CACHE / "containerd"


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


def _pki(directory: Path, node: bool = False) -> None:
    """CA, API server serving cert, service-account key pair and one client cert per
    component, as PEM files in directory; with node, the kubelet's serving and client certs
    and the apiserver's client cert for the kubelet."""
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
            *(x509.DNSName(n) for n in ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                                         f"kubernetes.default.svc.{CLUSTER_DOMAIN}")),
            *(x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", *([NODE_IP] if node else []))),
            x509.IPAddress(service_ip),
        ],
    )

    def client(name: str, user: str, group: str) -> None:
        subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, group), x509.NameAttribute(NameOID.COMMON_NAME, user)]
        issue(name, subject, ca_key, ca_cert.subject, usage=[ExtendedKeyUsageOID.CLIENT_AUTH])

    users = ("admin", "kube-controller-manager", "kuberay-operator")
    for user in users + (NODE_USERS if node else ()):
        client(user, user, "system:masters")
    if node:
        # The Node authorizer and NodeRestriction know a kubelet by this name and group.
        client("kubelet", f"system:node:{NODE_NAME}", "system:nodes")
        issue(
            "kubelet-serving",
            [x509.NameAttribute(NameOID.COMMON_NAME, NODE_NAME)],
            ca_key,
            ca_cert.subject,
            usage=[ExtendedKeyUsageOID.SERVER_AUTH],
            sans=[x509.DNSName(NODE_NAME), x509.IPAddress(ipaddress.ip_address(NODE_IP))],
        )
    sa_key = ec.generate_private_key(ec.SECP256R1())
    write_key("sa.key", sa_key)
    (directory / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _kubeconfig(path: Path, server: str, pki: Path, user: str) -> None:
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

    With node=True (root only), also kube-scheduler, containerd, the kubelet, kube-proxy and
    CoreDNS: pods run, with images from `image_store` (containerd's root, kept across
    `down`; node.py). `down()` then also undoes every change to the host.

    With kueue=True, also Kueue's manager (RayJobs only, those labelled
    kueue.x-k8s.io/queue-name) and its CRDs. Its webhooks serve, but no webhook
    configuration points the apiserver at them: a RayJob must be created suspended.
    """

    def __init__(self, bin_dir: Path | str | None = None, timeout: float = 120.0, kuberay_namespaces: tuple[str, ...] = (),
                 node: bool = False, image_store: Path | str | None = None, kueue: bool = False):
        self.bin_dir = Path(bin_dir) if bin_dir else None
        self.timeout = timeout
        self.kuberay_namespaces = kuberay_namespaces  # empty: KubeRay acts in every namespace
        self.node = node
        self.kueue = kueue
        self.image_store = Path(image_store) if image_store else DEFAULT_IMAGE_STORE
        self.state_dir: Path | None = None
        self.ports: dict[str, int] = {}
        self.pids: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen] = {}

    # paths and addresses

    @property
    def kubeconfig(self) -> Path:
        return self._dir / "kubeconfig"

    @property
    def host(self) -> str:
        return NODE_IP if self.node else "127.0.0.1"

    @property
    def server(self) -> str:
        return f"https://{self.host}:{self.ports['apiserver']}"

    @property
    def containerd_address(self) -> Path:
        return nodes.containerd_socket(self._dir)

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
        wanted = BINARIES + (NODE_BINARIES if self.node else ()) + (("kueue",) if self.kueue else ())
        missing = [b for b in wanted if not (self.bin_dir / b).exists()]
        if missing:
            raise ControlPlaneError(f"{self.bin_dir} lacks {', '.join(missing)}: run infra/build-controlplane.sh")
        if self.node:
            self._check_node_host()
        names = ("etcd", "etcd-peer", "apiserver", "kcm", "kuberay-metrics", "kuberay-probe")
        if self.node:
            names += ("scheduler", "kubelet-healthz", "kube-proxy-healthz", "kube-proxy-metrics", "coredns-health", "coredns-ready")
        if self.kueue:
            names += ("kueue-webhook", "kueue-health", "kueue-metrics")
        self.ports = {name: free_port() for name in names}
        pki = self._dir / "pki"
        _pki(pki, node=self.node)
        try:
            if self.node:
                nodes.HostChanges(self._dir / "host.json").record()
                self._save_state()
                nodes.setup_network()
            self._start_etcd()
            self._start_apiserver(pki)
            _kubeconfig(self.kubeconfig, self.server, pki, "admin")
            self.install_crds()
            self._start_controller_manager(pki)
            if self.node:
                self._start_node(pki)
            self._start_kuberay(pki)
            if self.kueue:
                self._start_kueue()
        except BaseException:
            self.down()
            raise
        return self

    def _check_node_host(self) -> None:
        if os.geteuid() != 0:
            raise ControlPlaneError("a node (--node) needs root: it runs containerd and the kubelet and sets up a bridge")
        if missing := nodes.missing_tools():
            raise ControlPlaneError(f"a node needs these host tools: {', '.join(missing)}")
        if other := ControlPlane.attach(DEFAULT_STATE_DIR) if self._dir != DEFAULT_STATE_DIR.resolve() else None:
            if other.node and other.running():
                raise ControlPlaneError(f"a node is already up (state in {DEFAULT_STATE_DIR}): one per machine; `finetune cluster down` first")
        with socket.socket() as s:  # the kubelet's fixed port
            try:
                s.bind(("0.0.0.0", nodes.KUBELET_PORT))
            except OSError:
                raise ControlPlaneError(f"port {nodes.KUBELET_PORT} is in use: another kubelet runs on this machine") from None

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
                f"--bind-address={self.host}",
                f"--advertise-address={self.host}",
                f"--cert-dir={self._dir / 'apiserver'}",
                f"--tls-cert-file={pki / 'serving.crt'}",
                f"--tls-private-key-file={pki / 'serving.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--service-account-issuer=https://kubernetes.default.svc.{CLUSTER_DOMAIN}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--allow-privileged=true",
                *(
                    [
                        "--authorization-mode=Node,RBAC",
                        "--enable-admission-plugins=NodeRestriction",
                        f"--kubelet-client-certificate={pki / 'kubelet-client.crt'}",
                        f"--kubelet-client-key={pki / 'kubelet-client.key'}",
                        f"--kubelet-certificate-authority={pki / 'ca.crt'}",
                        # by IP: the node's hostname is in no DNS the host asks
                        "--kubelet-preferred-address-types=InternalIP",
                    ]
                    if self.node
                    else [
                        "--authorization-mode=RBAC",
                        # No pods run, and no token controller mints tokens, as in envtest.
                        "--disable-admission-plugins=ServiceAccount",
                    ]
                ),
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
                f"--controllers={NODE_CONTROLLERS if self.node else CONTROLLERS}",
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

    def _start_node(self, pki: Path) -> None:
        """kube-scheduler, containerd, the kubelet (until its Node is Ready), kube-proxy, CoreDNS."""
        kubeconfigs = {}
        for user in ("kube-scheduler", "kube-proxy", "coredns", "kubelet"):
            kubeconfigs[user] = self._dir / f"{user}.kubeconfig"
            _kubeconfig(kubeconfigs[user], self.server, pki, user)
        # The pod sandbox image (registry.k8s.io is out of reach): built once, seconds.
        pause = images.build_images(names=("pause",))["pause"]
        files = nodes.write_configs(self._dir, pki, kubeconfigs, self.ports, self.image_store, pause.ref)
        port = self.ports["scheduler"]
        self._spawn("kube-scheduler", [
            self._bin("kube-scheduler"), f"--kubeconfig={kubeconfigs['kube-scheduler']}", "--leader-elect=false",
            f"--secure-port={port}", "--bind-address=127.0.0.1", f"--cert-dir={self._dir / 'kube-scheduler'}",
            f"--tls-cert-file={pki / 'serving.crt'}", f"--tls-private-key-file={pki / 'serving.key'}",
        ])
        self._wait("kube-scheduler", lambda: self._http(f"https://127.0.0.1:{port}/healthz", pki=pki) == "ok")
        self.image_store.mkdir(parents=True, exist_ok=True)
        self._spawn("containerd", [shutil.which("containerd"), f"--config={files['containerd']}"])
        self._wait("containerd", self.containerd_address.exists)
        images.import_images([pause], str(self.containerd_address))
        self._spawn("kubelet", [
            self._bin("kubelet"), f"--config={files['kubelet']}", f"--kubeconfig={kubeconfigs['kubelet']}",
            f"--hostname-override={nodes.NODE_NAME}", f"--node-ip={NODE_IP}", f"--root-dir={self._dir / 'kubelet'}",
            f"--cert-dir={self._dir / 'kubelet-pki'}",
        ])
        self._wait("kubelet", self._node_ready)
        self._spawn("kube-proxy", [self._bin("kube-proxy"), f"--config={files['kube-proxy']}"])
        self._wait("kube-proxy", lambda: self._http(f"http://127.0.0.1:{self.ports['kube-proxy-healthz']}/healthz") != "")
        self._spawn("coredns", [self._bin("coredns"), "-conf", str(files["coredns"])])
        self._wait("coredns", lambda: self._http(f"http://127.0.0.1:{self.ports['coredns-ready']}/ready") == "OK")

    def _node_ready(self) -> bool:
        try:
            status = self.api("GET", f"/api/v1/nodes/{nodes.NODE_NAME}").get("status") or {}
        except urllib.error.HTTPError:
            return False
        return any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))

    def _start_kuberay(self, pki: Path) -> None:
        kubeconfig = self._dir / "kuberay-operator.kubeconfig"
        _kubeconfig(kubeconfig, self.server, pki, "kuberay-operator")
        probe = self.ports["kuberay-probe"]
        # With a node, KubeRay reaches each head's dashboard by its Service's DNS name: it runs in
        # a private mount namespace whose /etc/resolv.conf names CoreDNS (the host's file stays).
        resolv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                  'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(self._dir / "resolv.conf")] if self.node else []
        self._spawn(
            "kuberay-operator",
            [
                *resolv,
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

    def _start_kueue(self) -> None:
        """Kueue's namespace and manager (as admin), until it is ready.

        Its internal certificate management stays on, as in its release: without it, v0.17
        exits unless the metrics server's certificate is at the fixed path
        /etc/kueue/metrics/certs. Its rotator fills the Secret created empty here (as the
        release's manifests do) and waits for that certificate in the webhook cert dir, where
        a kubelet would mount the Secret: we copy it there."""
        self.api("POST", "/api/v1/namespaces", {"metadata": {"name": KUEUE_NAMESPACE}})
        secrets = f"/api/v1/namespaces/{KUEUE_NAMESPACE}/secrets"
        self.api("POST", secrets, {"metadata": {"name": KUEUE_WEBHOOK_SECRET}})
        cert_dir = self._dir / "kueue" / "certs"
        cert_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "namespace": KUEUE_NAMESPACE,
            "manageJobsWithoutQueueName": False,
            "leaderElection": {"leaderElect": False},
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.ports['kueue-health']}"},
            "metrics": {"bindAddress": f"127.0.0.1:{self.ports['kueue-metrics']}"},
            "webhook": {"host": "127.0.0.1", "port": self.ports["kueue-webhook"], "certDir": str(cert_dir)},
            "internalCertManagement": {"enable": True},
            "integrations": {"frameworks": ["ray.io/rayjob"]},
            # The visibility API: an aggregated apiserver (no APIService here) on the fixed port
            # 8082, which writes its certificate to /visibility on the host.
            "featureGates": {"VisibilityOnDemand": False},
        }
        (self._dir / "kueue" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        self._spawn("kueue", [
            self._bin("kueue"), f"--config={self._dir / 'kueue' / 'config.yaml'}", f"--kubeconfig={self.kubeconfig}",
            "--zap-encoder=console",
        ])

        def mount_certificate() -> bool:
            data = self.api("GET", f"{secrets}/{KUEUE_WEBHOOK_SECRET}").get("data") or {}
            if "tls.crt" not in data:
                return False
            for name in ("tls.key", "tls.crt"):  # the rotator waits for tls.crt: the key first
                (cert_dir / name).write_bytes(base64.b64decode(data[name]))
            return True

        self._wait("kueue", mount_certificate)
        self._wait("kueue", lambda: self._http(f"http://127.0.0.1:{self.ports['kueue-health']}/readyz") == "ok")

    def down(self, remove_state: bool = False) -> None:
        """Stops every process (SIGTERM, then SIGKILL after 15 s); with a node, then kills what
        pods still run and undoes the host changes; with remove_state, also deletes the state dir."""
        for name in reversed(list(self.pids)):
            _stop(self.pids[name], self._procs.get(name), self._binary(name))
            if name == "kubelet":  # no kubelet restarts them now; containerd still runs them
                nodes.stop_pods(self.containerd_address)
        self.pids.clear()
        self._procs.clear()
        if self.state_dir is not None:
            if self.node:
                nodes.HostChanges(self.state_dir / "host.json").undo(extra_mount_roots=(self.state_dir, self.image_store))
            (self.state_dir / "state.json").unlink(missing_ok=True)
            if remove_state:
                shutil.rmtree(self.state_dir, ignore_errors=True)

    @classmethod
    def attach(cls, state_dir: Path | str) -> ControlPlane | None:
        """The control plane whose state.json is in state_dir, if any of it is running."""
        path = Path(state_dir) / "state.json"
        if not path.exists():
            return None
        state = json.loads(path.read_text())
        plane = cls(bin_dir=state["bin_dir"], node=state.get("node", False), image_store=state.get("image_store"),
                    kueue=state.get("kueue", False))
        plane.state_dir, plane.ports, plane.pids = Path(state_dir).resolve(), state["ports"], state["pids"]
        return plane

    def running(self) -> bool:
        """Whether every process is alive."""
        return bool(self.pids) and all(_alive(pid, self._binary(name)) for name, pid in self.pids.items())

    def _binary(self, name: str) -> str | None:
        """The executable a process of ours runs (what _alive checks against a recycled pid)."""
        if name == "containerd":
            return shutil.which("containerd")
        return self._bin(name) if self.bin_dir else None

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
        self._save_state()

    def _save_state(self) -> None:
        state = {"bin_dir": str(self.bin_dir), "ports": self.ports, "pids": self.pids, "kubeconfig": str(self.kubeconfig),
                 "node": self.node, "image_store": str(self.image_store), "kueue": self.kueue}
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
        all) from the same release as the operator binary; with kueue, Kueue's."""
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
        # Before kube-controller-manager starts: its garbage collector then deletes the Workloads
        # of deleted jobs at once, not after its next discovery (30 s), freeing their quota.
        return docs + (self.kueue_crd_documents() if self.kueue else [])

    def kueue_crd_documents(self) -> list[dict]:
        """Kueue's CRDs from the release of its binary, with the conversion webhooks its
        release patches in (unreachable here, and unused while clients ask for the stored
        version; the certificate rotator fails on a CRD without them)."""
        docs = [doc for path in sorted((self.bin_dir.parent / "kueue-crds").glob("*.yaml")) for doc in load_yaml(path)]
        if not docs:
            raise ControlPlaneError(f"Kueue CRDs not found in {self.bin_dir.parent / 'kueue-crds'}: run infra/build-controlplane.sh")
        service = {"namespace": KUEUE_NAMESPACE, "name": "kueue-webhook-service", "path": "/convert"}
        for doc in docs:
            if doc["spec"]["names"]["plural"] in KUEUE_CONVERTED_CRDS:
                doc["spec"]["conversion"] = {
                    "strategy": "Webhook",
                    "webhook": {"clientConfig": {"service": service}, "conversionReviewVersions": ["v1"]},
                }
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

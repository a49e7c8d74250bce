"""One real Kubernetes node on this machine, beside the control plane of controlplane.py, for
`finetune cluster up --node` and the e2e tests: containerd (runc, CNI bridge + host-local),
kubelet, kube-proxy (nftables), CoreDNS and kube-scheduler.

The node's address is the CNI bridge's: the apiserver, the kubelet and CoreDNS listen there,
so pods reach them and nothing listens beyond this machine. Pods get no route off it: an nft
rule drops whatever would be forwarded from the bridge to another interface.

Every host change is undone by `HostChanges.undo`: before the node starts, `HostChanges.record`
notes what the kubelet, containerd and kube-proxy are known to change (sysctls, nft tables and
chains, network devices, mounts, directories, cgroups); after its processes are stopped, undo
puts back whatever differs. Fixed host resources (ports 10250 and 53, the bridge) mean one node
per machine.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import yaml

BRIDGE = "finetune0"
POD_CIDR = "10.244.0.0/24"
NODE_IP = "10.244.0.1"  # the bridge's own address: the node's InternalIP, cluster DNS and the apiserver
NODE_NAME = "finetune-node"
CLUSTER_DOMAIN = "cluster.local"
KUBELET_PORT = 10250
CNI_BIN_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins
# What the node needs from the host, and the Debian package that has it.
HOST_TOOLS = {"containerd": "containerd", "runc": "runc", "ctr": "containerd", "nft": "nftables", "ip": "iproute2",
              "iptables": "iptables", "conntrack": "conntrack", "unshare": "util-linux"}
NFT_TABLE = "finetune"  # ours: inet finetune, the forward drop

# Host state the kubelet, containerd, runc, CNI and kube-proxy are known to write outside the
# node's state directory. undo() restores each sysctl, and deletes each directory that did not
# exist before (after unmounting anything below it).
SYSCTLS = (
    "net.ipv4.ip_forward",  # ours: pod -> ClusterIP -> pod is routed through the host
    "vm.overcommit_memory", "kernel.panic", "kernel.panic_on_oops",  # the kubelet's
    "net.ipv4.conf.all.route_localnet",  # kube-proxy's, for node ports on loopback
    "net.netfilter.nf_conntrack_max", "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
)
HOST_DIRS = ("/run/containerd", "/run/netns", "/var/lib/cni", "/var/log/containers", "/var/log/pods",
             "/var/lib/kubelet", "/etc/cni", "/opt/cni", "/opt/containerd")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_NAMES = ("kubepods", "kubepods.slice")
# nft tables that kube-proxy and the kubelet (through iptables-nft) create.
NFT_TABLES = {("ip", "kube-proxy"), ("ip6", "kube-proxy"), ("inet", NFT_TABLE)} | {
    (family, table) for family in ("ip", "ip6") for table in ("filter", "nat", "mangle")
}


class NodeError(RuntimeError):
    pass


def missing_tools() -> list[str]:
    return sorted({f"{tool} (apt-get install {pkg})" for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})


def _run(*argv: str, check: bool = True, input: str | None = None) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, input=input)
    if check and result.returncode != 0:
        raise NodeError(f"{' '.join(argv)}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def _sysctl_path(key: str) -> Path:
    return Path("/proc/sys") / key.replace(".", "/")


def _nft_state() -> dict[str, list[str]]:
    """Every nft table as 'family name' with its chains."""
    ruleset = json.loads(_run("nft", "-j", "list", "chains") or '{"nftables": []}')["nftables"]
    tables: dict[str, list[str]] = {}
    for item in ruleset:
        if "chain" in item:
            tables.setdefault(f"{item['chain']['family']} {item['chain']['table']}", []).append(item["chain"]["name"])
    for line in _run("nft", "list", "tables").splitlines():  # tables without chains too
        tables.setdefault(line.removeprefix("table ").strip(), [])
    return tables


def _mounts() -> list[str]:
    return [line.split()[1].encode().decode("unicode_escape") for line in Path("/proc/mounts").read_text().splitlines()]


def _links() -> list[str]:
    return [json_link["ifname"] for json_link in json.loads(_run("ip", "-j", "link", "show") or "[]")]


def host_state() -> dict:
    """What HostChanges compares: sysctls, directories, nft tables and chains, links, mounts, cgroups."""
    return {
        "sysctls": {k: _sysctl_path(k).read_text().strip() for k in SYSCTLS if _sysctl_path(k).exists()},
        "dirs": [d for d in HOST_DIRS if Path(d).exists()],
        "nft": _nft_state(),
        "links": _links(),
        "mounts": _mounts(),
        "cgroups": sorted(str(p) for p in _cgroups()),
    }


def _cgroups() -> list[Path]:
    return [p for controller in CGROUP_ROOT.iterdir() if controller.is_dir() for p in
            (controller / name for name in CGROUP_NAMES) if p.is_dir()]


class HostChanges:
    """The host as it was before the node started (host.json in the state dir), and undo()."""

    def __init__(self, path: Path):
        self.path = path

    def record(self) -> None:
        if not self.path.exists():  # a second `up` after a crash keeps the first record
            self.path.write_text(json.dumps(host_state(), indent=1))

    def undo(self, extra_mount_roots: tuple[Path, ...] = ()) -> None:
        if not self.path.exists():
            return
        before = json.loads(self.path.read_text())
        _unmount_below([*(Path(d) for d in HOST_DIRS if d not in before["dirs"]), *extra_mount_roots],
                       keep=set(before["mounts"]))
        for link in _links():
            if link not in before["links"] and (link == BRIDGE or link.startswith("veth")):
                _run("ip", "link", "delete", link, check=False)
        _undo_nft(before["nft"])
        for key, value in before["sysctls"].items():
            path = _sysctl_path(key)
            if path.exists() and path.read_text().strip() != value:
                path.write_text(value)
        for cgroup in _cgroups():
            if str(cgroup) not in before["cgroups"]:
                _remove_cgroup(cgroup)
        for d in HOST_DIRS:
            if d not in before["dirs"]:
                shutil.rmtree(d, ignore_errors=True)
        self.path.unlink()


def _unmount_below(roots: list[Path], keep: set[str]) -> None:
    roots = [str(r.resolve()) if r.exists() else str(r) for r in roots]
    for mount in sorted(_mounts(), key=len, reverse=True):  # children before parents
        if mount not in keep and any(mount == r or mount.startswith(r.rstrip("/") + "/") for r in roots):
            subprocess.run(["umount", "-l", mount], capture_output=True)


def _undo_nft(before: dict[str, list[str]]) -> None:
    now = _nft_state()
    for table, chains in now.items():
        family, name = table.split(" ", 1)
        if table not in before:
            if (family, name) in NFT_TABLES:
                _run("nft", "delete", "table", family, name, check=False)
            continue
        new = [c for c in chains if c not in before[table]]
        if not new:
            continue
        # Rules of older chains that jump to a new chain go first, then the new chains.
        rules = json.loads(_run("nft", "-j", "list", "table", family, name))["nftables"]
        for item in rules:
            rule = item.get("rule")
            if rule and rule["chain"] not in new and any(f'"{c}"' in json.dumps(rule["expr"]) for c in new):
                _run("nft", "delete", "rule", family, name, rule["chain"], "handle", str(rule["handle"]), check=False)
        for chain in new:
            _run("nft", "flush", "chain", family, name, chain, check=False)
        for chain in new:
            _run("nft", "delete", "chain", family, name, chain, check=False)


def _remove_cgroup(path: Path) -> None:
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        _kill_cgroup(child)
        child.rmdir()
    _kill_cgroup(path)
    path.rmdir()


def _kill_cgroup(path: Path) -> None:
    procs = path / "cgroup.procs"
    for pid in procs.read_text().split() if procs.exists() else ():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while procs.exists() and procs.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.1)


# --- network ---------------------------------------------------------------------------


def setup_network() -> None:
    """The bridge with the node address (before any pod: the apiserver binds to it), IP
    forwarding for ClusterIP traffic between pods, and the drop of anything leaving the bridge."""
    prefix = ipaddress.ip_network(POD_CIDR).prefixlen
    if BRIDGE not in _links():
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
    _run("ip", "addr", "replace", f"{NODE_IP}/{prefix}", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")
    _run("nft", "-f", "-", input=f"""
table inet {NFT_TABLE} {{
  chain forward {{
    type filter hook forward priority filter - 10; policy accept;
    iifname "{BRIDGE}" oifname != "{BRIDGE}" drop
  }}
}}
""")
    _sysctl_path("net.ipv4.ip_forward").write_text("1")


# --- configuration files -----------------------------------------------------------------


def containerd_config(state: Path, images: Path, sandbox_image: str) -> str:
    """containerd with its own socket, state and CNI folders; the image store under the
    cache (images survive `cluster down`, so a warm run imports nothing)."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{images}"
state = "{state / 'containerd'}"
oom_score = 0
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{containerd_socket(state)}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{state / 'containerd-opt'}"
[{cri}]
  sandbox_image = "{sandbox_image}"
  # This machine's root lacks CAP_SYS_RESOURCE: a negative oom_score_adj fails every sandbox.
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
[{cri}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{state / 'cni'}"
"""


def containerd_socket(state: Path) -> Path:
    return state / "containerd" / "containerd.sock"


def cni_config(state: Path) -> dict:
    return {
        "cniVersion": "0.4.0",
        "name": "finetune",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(state / "cni-ipam"),
                },
            }
        ],
    }


def kubelet_config(state: Path, pki: Path, healthz_port: int) -> dict:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": KUBELET_PORT,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "tlsCertFile": str(pki / "kubelet-serving.crt"),
        "tlsPrivateKeyFile": str(pki / "kubelet-serving.key"),
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True}, "x509": {"clientCAFile": str(pki / "ca.crt")}},
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": f"unix://{containerd_socket(state)}",
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,  # this host has cgroup v1
        "oomScoreAdj": 0,  # no CAP_SYS_RESOURCE for a negative one
        "clusterDNS": [NODE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(state / "resolv.conf"),
        "podLogsDir": str(state / "pod-logs"),
        "failSwapOn": False,
        "staticPodPath": "",
        "serializeImagePulls": False,
        # Imported images are the only copies (no registry to pull from again): never collect them.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        # Disk pressure makes the kubelet delete every unused image (pause included: no pod then
        # starts) and taint the node for 5 minutes. The disk is the host's, often a large shared
        # one: 2% of 252G (5 GB free) tripped it in CI. Evict only when it is really full.
        "evictionHard": {"memory.available": "200Mi", "nodefs.available": "512Mi", "imagefs.available": "512Mi"},
        "shutdownGracePeriod": "0s",
    }


def kube_proxy_config(kubeconfig: Path, healthz_port: int, metrics_port: int) -> dict:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "nftables",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": NODE_NAME,
        "clusterCIDR": POD_CIDR,
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        "nodePortAddresses": [f"{NODE_IP}/32"],
        "oomScoreAdj": 0,
        # 0: leave the host's conntrack sysctls as they are.
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        # Pod -> ClusterIP -> pod on the same bridge: without br_netfilter the reply would skip
        # the DNAT's reverse translation, so every service connection is masqueraded.
        "nftables": {"masqueradeAll": True},
    }


def corefile(kubeconfig: Path, health_port: int, ready_port: int) -> str:
    return f""".:53 {{
    bind {NODE_IP}
    errors
    health 127.0.0.1:{health_port}
    ready 127.0.0.1:{ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} finetune
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 30
    loadbalance
}}
"""


def write_configs(state: Path, pki: Path, kubeconfigs: dict[str, Path], ports: dict[str, int], images: Path, sandbox_image: str) -> dict[str, Path]:
    files = {
        "containerd": (state / "containerd.toml", containerd_config(state, images, sandbox_image)),
        "cni": (state / "cni" / "10-finetune.conflist", json.dumps(cni_config(state), indent=1)),
        "kubelet": (state / "kubelet.yaml", yaml.safe_dump(kubelet_config(state, pki, ports["kubelet-healthz"]))),
        "kube-proxy": (state / "kube-proxy.yaml", yaml.safe_dump(
            kube_proxy_config(kubeconfigs["kube-proxy"], ports["kube-proxy-healthz"], ports["kube-proxy-metrics"]))),
        "coredns": (state / "Corefile", corefile(kubeconfigs["coredns"], ports["coredns-health"], ports["coredns-ready"])),
        # Cluster DNS for pods with dnsPolicy Default and for the host-side KubeRay operator.
        "resolv": (state / "resolv.conf", f"nameserver {NODE_IP}\nsearch svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}\noptions ndots:5\n"),
    }
    for path, text in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return {name: path for name, (path, _) in files.items()}


def stop_pods(containerd_address: Path) -> None:
    """Kills every container containerd still runs for the node, so no process of a pod outlives
    `cluster down` (the kubelet is already stopped; its pods would otherwise go on)."""
    if not containerd_address.exists():
        return
    ctr = ["ctr", "--address", str(containerd_address), "-n", "k8s.io"]
    for task in _run(*ctr, "tasks", "ls", "-q", check=False).split():
        _run(*ctr, "tasks", "kill", "-s", "SIGKILL", task, check=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        running = [line for line in _run(*ctr, "tasks", "ls", check=False).splitlines()[1:] if "RUNNING" in line]
        if not running:
            break
        time.sleep(0.2)
    for task in _run(*ctr, "tasks", "ls", "-q", check=False).split():
        _run(*ctr, "tasks", "delete", "-f", task, check=False)
    for container in _run(*ctr, "containers", "ls", "-q", check=False).split():
        _run(*ctr, "containers", "delete", container, check=False)


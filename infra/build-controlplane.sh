#!/usr/bin/env bash
# Builds the binaries of the test cluster from Go modules (no release downloads):
#   etcd, kube-apiserver, kube-controller-manager,   from infra/controlplane (k8s.io/kubernetes),
#   kube-scheduler, kubelet, kube-proxy              in one `go build`
#   kuberay-operator                                 from infra/controlplane/kuberay
#   coredns                                          from infra/controlplane/coredns
#   kueue                                            from infra/controlplane/kueue
# into a cache directory outside the repo, and prints that bin directory on stdout.
# KubeRay's and Kueue's CRDs of the same releases (from their modules) are copied to
# ../kuberay-crds and ../kueue-crds.
#
# Idempotent: a stamp file holds a hash of the sources (go.mod, go.sum, *.go, this
# script); when it matches and every binary is there, nothing is built (a fresh clone
# with new mtimes still hits the cache). Otherwise `go build` runs, which is itself
# incremental through Go's build cache.
#
# Environment: FINETUNE_CONTROLPLANE_CACHE overrides the cache root
# (default ${XDG_CACHE_HOME:-~/.cache}/finetune/controlplane).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$here/controlplane"
kube_binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)
binaries=("${kube_binaries[@]}" kuberay-operator coredns kueue)

command -v go >/dev/null || { echo "build-controlplane: 'go' is not on PATH" >&2; exit 1; }

mod_version() { awk -v m="$1" '$1 == m { print $2; exit }' "$2"; }
k8s_version="$(mod_version k8s.io/kubernetes "$src/go.mod")"
kuberay_version="$(mod_version github.com/ray-project/kuberay/ray-operator "$src/kuberay/go.mod")"
kueue_version="$(mod_version sigs.k8s.io/kueue "$src/kueue/go.mod")"
cache_root="${FINETUNE_CONTROLPLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune/controlplane}"
bin="$cache_root/$k8s_version-kuberay-$kuberay_version-kueue-$kueue_version/bin"
mkdir -p "$bin"

sources_hash() {
  (cd "$src" && find . -type f \( -name go.mod -o -name go.sum -o -name '*.go' \) | LC_ALL=C sort |
    xargs sha256sum; sha256sum "$here/build-controlplane.sh" | cut -d' ' -f1) | sha256sum | cut -d' ' -f1
}

up_to_date() {
  local b
  for b in "${binaries[@]}"; do [[ -x "$bin/$b" ]] || return 1; done
  [[ -f "$bin/../kuberay-crds/ray.io_rayservices.yaml" ]] || return 1
  [[ -f "$bin/../kueue-crds/kueue.x-k8s.io_workloads.yaml" ]] || return 1
  [[ -f "$bin/.stamp" && "$(cat "$bin/.stamp")" == "$(sources_hash)" ]]
}

if up_to_date; then echo "$bin"; exit 0; fi

# One build at a time (the CLI and a test fixture may both ask for one).
exec 9>"$bin/.lock"
flock 9
if up_to_date; then echo "$bin"; exit 0; fi
rm -f "$bin/.stamp"

# Version stamps, as a release build sets them (kubectl version, /version).
minor="${k8s_version#v1.}"; minor="${minor%%.*}"
kver="k8s.io/component-base/version"
ldflags="-s -w -X $kver.gitVersion=$k8s_version -X $kver.gitMajor=1 -X $kver.gitMinor=$minor"
ldflags+=" -X $kver.gitTreeState=clean -X $kver.buildDate=1970-01-01T00:00:00Z"

build() {  # build MODULE_DIR LDFLAGS PACKAGE... : one `go build`, every main into $bin
  local dir="$1" flags="$2" start=$SECONDS out="$bin/.build"
  shift 2
  echo "build-controlplane: building $* ..." >&2
  rm -rf "$out" && mkdir -p "$out"
  (cd "$dir" && go build -buildvcs=false -trimpath -ldflags "$flags" -o "$out/" "$@")
  mv -f "$out"/* "$bin/" && rmdir "$out"
  echo "build-controlplane: built in $((SECONDS - start))s" >&2
}

build "$src" "$ldflags" "${kube_binaries[@]/#/./cmd/}"
build "$src/kuberay" "-s -w" github.com/ray-project/kuberay/ray-operator
mv -f "$bin/ray-operator" "$bin/kuberay-operator"
build "$src/coredns" "-s -w" .
build "$src/kueue" "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$kueue_version" sigs.k8s.io/kueue/cmd/kueue
# The operator watches every kind it manages (RayService, too): its CRDs go with it.
kuberay_dir="$(cd "$src/kuberay" && go list -m -f '{{.Dir}}' github.com/ray-project/kuberay/ray-operator)"
mkdir -p "$bin/../kuberay-crds"
cp -f "$kuberay_dir"/config/crd/bases/*.yaml "$bin/../kuberay-crds/"
chmod u+w "$bin"/../kuberay-crds/*.yaml
# Kueue's, as its release installs them before the kustomize patches (the control plane adds
# the conversion webhooks it patches in).
kueue_dir="$(cd "$src/kueue" && go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)"
mkdir -p "$bin/../kueue-crds"
cp -f "$kueue_dir"/config/components/crd/bases/*.yaml "$bin/../kueue-crds/"
chmod u+w "$bin"/../kueue-crds/*.yaml

sources_hash >"$bin/.stamp"
echo "$bin"

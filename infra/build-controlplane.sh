#!/usr/bin/env bash
# Builds the binaries of the test control plane from Go modules (no release downloads):
#   etcd, kube-apiserver, kube-controller-manager   from infra/controlplane (k8s.io/kubernetes)
#   kuberay-operator                                 from infra/controlplane/kuberay
# into a cache directory outside the repo, and prints that bin directory on stdout.
# KubeRay's CRDs of the same release (from its module) are copied to ../kuberay-crds.
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
binaries=(etcd kube-apiserver kube-controller-manager kuberay-operator)

command -v go >/dev/null || { echo "build-controlplane: 'go' is not on PATH" >&2; exit 1; }

mod_version() { awk -v m="$1" '$1 == m { print $2; exit }' "$2"; }
k8s_version="$(mod_version k8s.io/kubernetes "$src/go.mod")"
kuberay_version="$(mod_version github.com/ray-project/kuberay/ray-operator "$src/kuberay/go.mod")"
cache_root="${FINETUNE_CONTROLPLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune/controlplane}"
bin="$cache_root/$k8s_version-kuberay-$kuberay_version/bin"
mkdir -p "$bin"

sources_hash() {
  (cd "$src" && find . -type f \( -name go.mod -o -name go.sum -o -name '*.go' \) | LC_ALL=C sort |
    xargs sha256sum; sha256sum "$here/build-controlplane.sh" | cut -d' ' -f1) | sha256sum | cut -d' ' -f1
}

up_to_date() {
  local b
  for b in "${binaries[@]}"; do [[ -x "$bin/$b" ]] || return 1; done
  [[ -f "$bin/../kuberay-crds/ray.io_rayservices.yaml" ]] || return 1
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

build() {  # build NAME MODULE_DIR PACKAGE [LDFLAGS]
  local name="$1" dir="$2" pkg="$3" flags="${4:--s -w}" start=$SECONDS
  echo "build-controlplane: building $name ..." >&2
  (cd "$dir" && go build -buildvcs=false -trimpath -ldflags "$flags" -o "$bin/$name.tmp" "$pkg")
  mv -f "$bin/$name.tmp" "$bin/$name"
  echo "build-controlplane: $name built in $((SECONDS - start))s" >&2
}

build kube-apiserver "$src" ./cmd/kube-apiserver "$ldflags"
build kube-controller-manager "$src" ./cmd/kube-controller-manager "$ldflags"
build etcd "$src" ./cmd/etcd
build kuberay-operator "$src/kuberay" github.com/ray-project/kuberay/ray-operator
# The operator watches every kind it manages (RayService, too): its CRDs go with it.
kuberay_dir="$(cd "$src/kuberay" && go list -m -f '{{.Dir}}' github.com/ray-project/kuberay/ray-operator)"
mkdir -p "$bin/../kuberay-crds"
cp -f "$kuberay_dir"/config/crd/bases/*.yaml "$bin/../kuberay-crds/"
chmod u+w "$bin"/../kuberay-crds/*.yaml

sources_hash >"$bin/.stamp"
echo "$bin"

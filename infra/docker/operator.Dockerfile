# syntax=docker/dockerfile:1
# The operator: `finetune operator` with the project's `operator` extra (kopf, kubernetes,
# boto3, prometheus-client). Build from the repository root:
#   docker build -f infra/docker/operator.Dockerfile -t ghcr.io/finetune-operator/operator:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A virtual environment is copied whole into the runtime stage: no pip, no build files there.
RUN python -m venv /opt/finetune
ENV PATH=/opt/finetune/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY jobs ./jobs
COPY operator ./operator
# Not editable (-e): the runtime stage has no /src. Versions come from pyproject.toml's ranges.
# hadolint ignore=DL3013
RUN pip install ".[operator]"

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/finetune /opt/finetune
ENV PATH=/opt/finetune/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp
# 65532: the conventional "nonroot" uid; the chart's securityContext runs it as that uid with
# a read-only root filesystem and a writable /tmp.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["finetune"]
CMD ["operator"]

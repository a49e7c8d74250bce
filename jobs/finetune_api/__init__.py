"""The FineTuneJob API: one set of pydantic models that the CLI, the operator and the
training program all parse, and that the CRD's OpenAPI schema is generated from."""

from finetune_api.spec import (
    API_VERSION,
    GROUP,
    KIND,
    VERSION,
    FineTuneJob,
    FineTuneJobSpec,
    SpecError,
    load_manifests,
    parse_job,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "VERSION",
    "FineTuneJob",
    "FineTuneJobSpec",
    "SpecError",
    "load_manifests",
    "parse_job",
]

"""The kinds of the API, registered once: the CRD generator, the operator and the CLI all take
names, models and parsing from here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune_api.spec import GROUP, KIND, FineTuneJob, Model, Resource, SpecError, parse_resource
from finetune_api.status import JobStatus, SweepStatus
from finetune_api.sweep import SWEEP_KIND, FineTuneSweep

AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
PHASE = {"name": "Phase", "type": "string", "description": "Pending, Initializing, Running, Suspended, Succeeded or Failed.",
         "jsonPath": ".status.phase"}


@dataclass(frozen=True)
class Kind:
    name: str
    plural: str
    singular: str
    short_name: str
    resource: type[Resource]
    status: type[Model]
    columns: tuple[dict, ...]  # kubectl get's columns; the generator checks each path against the schema
    description: str
    spec_description: str

    @property
    def noun(self) -> str:
        """job, sweep: how messages name it."""
        return self.name.removeprefix("FineTune").lower()

    @property
    def label(self) -> str:
        """The label whose value names the object on every Ray pod that runs it."""
        return f"{GROUP}/{self.noun}"

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"

    @property
    def spec(self) -> type[Model]:
        return self.resource.model_fields["spec"].annotation

    @property
    def immutable(self) -> tuple[str, ...]:
        """The spec's fields that never change once the object exists."""
        return self.spec.immutable

    def parse(self, doc: Any, source: str = "manifest") -> Resource:
        return parse_resource(self.resource, doc, source)


JOB = Kind(
    KIND, "finetunejobs", "finetunejob", "ftj", FineTuneJob, JobStatus,
    (
        PHASE,
        {"name": "Progress", "type": "integer", "description": "Percent of the training steps done.",
         "jsonPath": ".status.progress.percent"},
        {"name": "Loss", "type": "number", "description": "Latest training loss.", "jsonPath": ".status.metrics.trainLoss"},
        AGE,
    ),
    "FineTuneJob fine-tunes a pretrained model on a dataset with Ray Train and DeepSpeed on a KubeRay cluster, "
    "and exports the result to storage.",
    "What to fine-tune (model), on what (dataset), how (method, deepspeed, training), on what hardware (resources) "
    "and where results go (checkpointing, storage, output).",
)
SWEEP = Kind(
    SWEEP_KIND, "finetunesweeps", "finetunesweep", "fts", FineTuneSweep, SweepStatus,
    (
        PHASE,
        {"name": "Trials", "type": "string", "description": "Trials finished of maxTrials.", "jsonPath": ".status.trialsDone"},
        {"name": "Best", "type": "string", "description": "The best trial so far.", "jsonPath": ".status.bestTrial.name"},
        {"name": "Metric", "type": "number", "description": "The best trial's metric.", "jsonPath": ".status.bestTrial.metric"},
        AGE,
    ),
    "FineTuneSweep searches hyper-parameters of a FineTuneJob spec with Ray Tune: each trial is a distributed "
    "Ray Train run; the best trial's model is exported.",
    "A FineTuneJob spec (template), the fields to search (searchSpace) and how to compare and stop trials.",
)
KINDS = {k.name: k for k in (JOB, SWEEP)}


def parse(doc: Any, source: str = "manifest") -> FineTuneJob | FineTuneSweep:
    """A FineTuneJob or FineTuneSweep, by the document's kind; SpecError naming each bad field."""
    kind = KINDS.get(doc.get("kind")) if isinstance(doc, dict) else None
    if kind is None:
        got = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
        raise SpecError(source, [f"kind: must be one of {', '.join(KINDS)} (got {got!r})"])
    return kind.parse(doc, source)

"""FineTuneSweep: a FineTuneJob spec as a template, a search space over its fields, and how Ray
Tune searches it (metric, mode, ASHA early stopping, trial counts). The same models give the
CRD, `finetune validate` and the sweep driver its parameters."""

from __future__ import annotations

import base64
import json
import math
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, ValidationError, model_validator

from finetune_api.spec import (
    FieldError, FineTuneJobSpec, Resource, Rule, Spec, _error_lines, _spec_types, dump_spec, eval_metrics, parse_resource,
)

SWEEP_KIND = "FineTuneSweep"


# What a trial computes. The rest (resources, storage, pods, scheduling, the queue) shapes the
# sweep's one Ray cluster, which every trial shares as the template has it.
TRIAL_SECTIONS = ("model", "dataset", "method", "deepspeed", "training", "checkpointing", "output")


def leaf_paths(model: type[Spec] = FineTuneJobSpec, prefix: str = "") -> list[str]:
    """Every scalar field of the job spec's trial sections as a dotted camelCase path
    (training.lr, method.lora.r), none inside a list or map: what a search space may name."""
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{field.alias or name}"
        if _is_container(field.annotation) or (not prefix and path not in TRIAL_SECTIONS):
            continue
        subs = _spec_types(field.annotation)
        if subs:
            out.extend(leaf_paths(subs[0], f"{path}."))
        else:
            out.append(path)
    return out


def _is_container(annotation: Any) -> bool:
    origin = getattr(annotation, "__origin__", None)
    return origin in (list, dict) or any(_is_container(a) for a in getattr(annotation, "__args__", ()))


def set_path(doc: dict, path: str, value: Any) -> dict:
    """A copy of a wire-form spec with one dotted path set."""
    out = json.loads(json.dumps(doc))
    node = out
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


class Range(Spec):
    low: float
    high: float

    rules = (Rule("low", "low must be below high", "self.low < self.high", lambda r: r.low < r.high),)


class SearchParam(Spec):
    """Exactly one distribution, named as in Ray Tune. (The CRD says "exactly one" with
    min/maxProperties: a rule cannot read `choice`, whose items may be of any type.)"""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1, "maxProperties": 1})
    choice: list[Any] | None = Field(default=None, min_length=1, description="One of these values.")
    uniform: Range | None = Field(default=None, description="A float in [low, high].")
    loguniform: Range | None = Field(default=None, description="A float in [low, high], uniform in log space.")
    randint: Range | None = Field(default=None, description="An integer in [low, high).")

    rules = (
        Rule("loguniform.low", "loguniform needs low > 0", "!has(self.loguniform) || self.loguniform.low > 0.0",
             lambda p: p.loguniform is None or p.loguniform.low > 0),
    )

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise FieldError("choice", f"give exactly one of choice, uniform, loguniform, randint (got {', '.join(given) or 'none'})")
        return self

    @property
    def type(self) -> str:
        return next(k for k in ("choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None)

    @property
    def values(self) -> list[Any] | None:
        return self.choice

    @property
    def low(self) -> float | None:
        return None if self.choice is not None else getattr(self, self.type).low

    @property
    def high(self) -> float | None:
        return None if self.choice is not None else getattr(self, self.type).high

    def bounds(self) -> list[Any]:
        """The values a trial can take at the edges (all of them for a choice)."""
        if self.type == "choice":
            return list(self.values)
        if self.type == "randint":
            return [math.ceil(self.low), math.ceil(self.high) - 1]
        return [self.low, self.high]


class SchedulerSpec(Spec):
    type: Literal["asha", "none"] = Field(default="asha", description="asha stops trials that fall behind early; none runs every trial to the end.")
    grace_period: int = Field(default=2, ge=1, description="Evaluations a trial always gets before ASHA may stop it.")
    reduction_factor: float = Field(default=3, gt=1, description="ASHA keeps the best 1/reductionFactor at each rung.")


class FineTuneSweepSpec(Spec):
    template: FineTuneJobSpec = Field(description="The FineTuneJob spec every trial starts from.")
    search_space: dict[str, SearchParam] = Field(
        min_length=1, max_length=32, description="Per field of the template (a dotted path like training.lr or method.lora.r), its distribution."
    )
    metric: str | None = Field(default=None, description="The eval metric trials are compared by, e.g. eval_loss or eval_accuracy.")
    mode: Literal["min", "max"] | None = Field(default=None, description="Default: min for losses and perplexity, max otherwise.")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    max_trials: int = Field(default=4, ge=1, le=1000, description="Trials to run (Ray Tune's num_samples).")
    max_concurrent_trials: int = Field(default=1, ge=1, le=1000, description="Trials running at once; each takes template.resources.")
    suspend: bool = Field(
        default=False, description="true stops the sweep's Ray cluster after every running trial saved a checkpoint; false again "
        "continues each trial from it. The only field of a sweep that may change.",
    )

    paths: ClassVar[tuple[str, ...]] = tuple(leaf_paths())
    rules = (
        Rule("searchSpace", "every key of searchSpace must be a field of the template that a trial computes with (in "
             + ", ".join(TRIAL_SECTIONS) + "; not in a list), e.g. training.lr or method.lora.r",
             "self.searchSpace.all(k, k in [" + ", ".join(f"'{p}'" for p in leaf_paths()) + "])",
             lambda s: all(k in FineTuneSweepSpec.paths for k in s.search_space)),
        Rule("metric", "scheduler.type asha compares trials by metric: set metric (e.g. eval_loss) or scheduler.type none",
             "has(self.metric) || (has(self.scheduler) && has(self.scheduler.type) && self.scheduler.type == 'none')",
             lambda s: s.metric is not None or s.scheduler.type == "none"),
        Rule("maxConcurrentTrials", "maxConcurrentTrials must not exceed maxTrials",
             "!has(self.maxConcurrentTrials) || !has(self.maxTrials) || self.maxConcurrentTrials <= self.maxTrials",
             lambda s: s.max_concurrent_trials <= s.max_trials),
        Rule("template.suspend", "a sweep is suspended by its own spec.suspend; remove template.suspend",
             "!has(self.template.suspend) || !self.template.suspend", lambda s: not s.template.suspend),
    )
    # Everything but suspend: a sweep's trials are sampled from what it was created with.
    immutable: ClassVar[tuple[str, ...]] = (
        "template", "searchSpace", "metric", "mode", "scheduler", "maxTrials", "maxConcurrentTrials",
    )

    @model_validator(mode="after")
    def _check_trials(self):
        """Each trial's spec must be a valid job: the metric exists for the task, the template
        evaluates, and every edge of every distribution gives a valid spec (a value the
        apiserver cannot check)."""
        metrics = eval_metrics(self.template.model.task)
        if self.metric is not None and self.metric not in metrics:
            raise FieldError("metric", f"metric must be one of {', '.join(metrics)} for task {self.template.model.task}")
        if self.template.training.eval_every is None and self.scheduler.type == "asha":
            raise FieldError("template.training.evalEvery", "ASHA compares trials at each evaluation: set template.training.evalEvery")
        base = dump_spec(self.template)
        for path, param in self.search_space.items():
            if path not in self.paths:
                continue  # the rule above names it
            for value in param.bounds():
                try:
                    FineTuneJobSpec.model_validate(set_path(base, path, value))
                except ValidationError as err:
                    reason = "; ".join(_error_lines(err, FineTuneJobSpec)[:1])
                    raise FieldError(f"searchSpace.{path}", f"a trial with {path} = {value!r} is not a valid job ({reason})") from None
        return self

    @property
    def direction(self) -> str:
        if self.mode:
            return self.mode
        metric = self.metric or "eval_loss"
        return "min" if metric.endswith(("loss", "perplexity")) else "max"

    def trial_spec(self, params: dict[str, Any]) -> FineTuneJobSpec:
        doc = dump_spec(self.template)
        for path, value in params.items():
            doc = set_path(doc, path, value)
        return FineTuneJobSpec.model_validate(doc)


class FineTuneSweep(Resource):
    kind: Literal["FineTuneSweep"]
    spec: FineTuneSweepSpec


def parse_sweep(doc: Any, source: str = "manifest") -> FineTuneSweep:
    return parse_resource(FineTuneSweep, doc, source)


def decode_sweep(text: str) -> FineTuneSweep:
    return parse_sweep(json.loads(base64.b64decode(text)), "--sweep")

"""FineTuneJob `spec` models.

Every cross-field rule is declared once as a `Rule`: Python evaluates `holds`, the CRD
carries `cel`, and both report the same field and message, so `finetune validate` and
the Kubernetes apiserver reject the same specs with the same words.
"""

from __future__ import annotations

import base64
import difflib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"

# Kubernetes object names we derive others from (RayJob, ConfigMap, storage prefix)
# must stay valid DNS-1123 labels after a short prefix is added.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
MAX_NAME_LENGTH = 48


class Rule(NamedTuple):
    """A cross-field rule. `field` is relative to the model that declares the rule."""

    field: str
    message: str
    cel: str
    holds: Callable[[Any], bool]


class FieldError(ValueError):
    """A rule violation that knows which field it is about."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class SpecError(ValueError):
    """A manifest that does not describe a valid FineTuneJob; `errors` are
    `path: message` lines, each naming the offending field."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        super().__init__(f"{source}:\n" + "\n".join(f"  {e}" for e in errors))


class Spec(BaseModel):
    """Base of every spec model: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True
    )
    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self):
        for rule in self.rules:
            if not rule.holds(self):
                raise FieldError(rule.field, rule.message)
        return self


PositiveInt = Annotated[int, Field(ge=1)]


class ModelSpec(Spec):
    source: str = Field(
        min_length=1,
        description="Pretrained model: a Hugging Face id (org/name), s3://bucket/path, a local "
        "directory, or package:<python-distribution> for a model shipped inside a Python package.",
    )
    task: Literal["causal-lm", "sequence-classification"] = Field(
        description="causal-lm: supervised fine-tuning of a language model; "
        "sequence-classification: one label per text."
    )
    # Bounded so that the CRD's uniqueness rule (quadratic) stays within the apiserver's
    # CEL cost budget; more classes than this: integer labels and numLabels.
    labels: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        default=None,
        min_length=2,
        max_length=256,
        description="Class names in id order (sequence-classification); written to config.id2label. "
        "At most 256; for more classes use integer labels and numLabels.",
    )
    num_labels: int | None = Field(
        default=None, ge=2, le=100_000, description="Number of classes when labels are integers."
    )
    gguf_file: str | None = Field(
        default=None,
        description="GGUF file inside source to load (dequantized); found automatically when the "
        "source holds exactly one .gguf file.",
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = False
    init: Literal["pretrained", "random"] = Field(
        default="pretrained",
        description="random: build the architecture of source (with config overrides) with fresh "
        "weights; the tokenizer still comes from source.",
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides applied to the model's transformers config, e.g. num_hidden_layers.",
    )

    rules = (
        Rule(
            "labels",
            "sequence-classification needs labels (class names) or numLabels",
            "self.task != 'sequence-classification' || has(self.labels) || has(self.numLabels)",
            lambda m: m.task != "sequence-classification" or bool(m.labels) or m.num_labels is not None,
        ),
        Rule(
            "labels",
            "labels and numLabels are only for sequence-classification; remove them for causal-lm",
            "self.task == 'sequence-classification' || (!has(self.labels) && !has(self.numLabels))",
            lambda m: m.task == "sequence-classification" or (m.labels is None and m.num_labels is None),
        ),
        Rule(
            "numLabels",
            "numLabels must equal the number of labels; set one of them",
            "!has(self.labels) || !has(self.numLabels) || self.labels.size() == self.numLabels",
            lambda m: m.labels is None or m.num_labels is None or len(m.labels) == m.num_labels,
        ),
        Rule(
            "labels",
            "labels must be unique: list each class name once",
            "!has(self.labels) || self.labels.all(l, self.labels.exists_one(m, m == l))",
            lambda m: m.labels is None or len(set(m.labels)) == len(m.labels),
        ),
    )

    @property
    def num_classes(self) -> int | None:
        return len(self.labels) if self.labels else self.num_labels


FORMATS = ("jsonl", "csv", "parquet")


class DatasetSpec(Spec):
    train: str = Field(min_length=1, description="Training file: local path or s3:// URI.")
    validation: str | None = Field(default=None, description="Validation file (same format).")
    validation_split: float | None = Field(
        default=None, gt=0, lt=1, description="Fraction of train held out for validation."
    )
    seed: int = Field(default=42, description="Seed of the validation split and shuffling.")
    format: Literal["auto", "jsonl", "csv", "parquet"] = Field(
        default="auto", description="auto: from the file extension."
    )
    text_column: str | None = Field(default=None, description="Plain text (causal-lm) or the text to classify.")
    prompt_column: str | None = Field(default=None, description="Prompt; loss is masked on it (causal-lm).")
    completion_column: str | None = Field(default=None, description="Completion trained on (causal-lm).")
    messages_column: str | None = Field(
        default=None,
        description="Chat messages rendered with the tokenizer's chat template; loss only on "
        "assistant turns (causal-lm).",
    )
    label_column: str | None = Field(default=None, description="Label: a class name or id (classification).")
    max_length: int = Field(default=512, ge=8, le=131_072, description="Tokens per example (truncated).")

    rules = (
        Rule(
            "validationSplit",
            "set either validation (a file) or validationSplit (a fraction), not both",
            "!has(self.validation) || !has(self.validationSplit)",
            lambda d: d.validation is None or d.validation_split is None,
        ),
        Rule(
            "completionColumn",
            "promptColumn and completionColumn go together",
            "has(self.promptColumn) == has(self.completionColumn)",
            lambda d: (d.prompt_column is None) == (d.completion_column is None),
        ),
        Rule(
            "messagesColumn",
            "use one input style: textColumn, promptColumn+completionColumn, or messagesColumn",
            "[has(self.textColumn), has(self.promptColumn), has(self.messagesColumn)]"
            ".filter(x, x).size() <= 1",
            lambda d: sum(c is not None for c in (d.text_column, d.prompt_column, d.messages_column)) <= 1,
        ),
    )

    @property
    def style(self) -> Literal["text", "prompt-completion", "chat"]:
        if self.messages_column:
            return "chat"
        if self.prompt_column:
            return "prompt-completion"
        return "text"


class LoraSpec(Spec):
    r: int = Field(default=8, ge=1, le=1024, description="Rank of the update matrices.")
    alpha: float = Field(default=16, gt=0, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None,
        min_length=1,
        description="Module names to adapt; default: peft's choice for the architecture "
        "(e.g. q_proj,v_proj for Llama, query,value for BERT); [all-linear] adapts every linear layer.",
    )


class ProgressiveUnfreezingSpec(Spec):
    every_steps: PositiveInt = Field(description="Unfreeze one more block, from the top, every K steps.")


class FreezeSpec(Spec):
    trainable_layers: int = Field(
        default=0,
        ge=0,
        description="Top transformer blocks trained with the head; 0 = feature extraction (only "
        "what sits above the blocks trains). Embeddings stay frozen.",
    )
    progressive_unfreezing: ProgressiveUnfreezingSpec | None = None


class MethodSpec(Spec):
    type: Literal["full", "lora", "freeze"] = Field(
        default="full", description="full: every weight; lora: low-rank adapters; freeze: top only."
    )
    lora: LoraSpec | None = None
    freeze: FreezeSpec | None = None

    rules = (
        Rule(
            "lora",
            "lora settings need type: lora",
            "!has(self.lora) || self.type == 'lora'",
            lambda m: m.lora is None or m.type == "lora",
        ),
        Rule(
            "freeze",
            "freeze settings need type: freeze",
            "!has(self.freeze) || self.type == 'freeze'",
            lambda m: m.freeze is None or m.type == "freeze",
        ),
    )

    @model_validator(mode="after")
    def _fill_method_defaults(self):
        if self.type == "lora" and self.lora is None:
            self.lora = LoraSpec()
        if self.type == "freeze" and self.freeze is None:
            self.freeze = FreezeSpec()
        return self


class DeepSpeedSpec(Spec):
    zero_stage: int = Field(default=2, ge=0, le=3, description="ZeRO stage 0 (plain DDP) to 3.")
    cpu_offload: bool = Field(
        default=False,
        description="Offload optimizer state to CPU memory (and parameters too at ZeRO-3).",
    )

    rules = (
        Rule(
            "cpuOffload",
            "cpuOffload needs zeroStage 1, 2 or 3",
            # has(): the apiserver checks the rule against the CRD's `deepspeed: {}` default
            # before its children are defaulted.
            "!has(self.cpuOffload) || !self.cpuOffload || !has(self.zeroStage) || self.zeroStage > 0",
            lambda d: not d.cpu_offload or d.zero_stage > 0,
        ),
    )


QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"
URL_PATTERN = r"^https?://[^/\s]+/?$"

# What a value matching each pattern looks like, in the words of the error message.
PATTERN_HINTS = {
    NAME_PATTERN: "must be a DNS-1123 label: lowercase letters, digits and '-', starting and "
    "ending with a letter or digit",
    QUANTITY: "must be a Kubernetes quantity such as 16Gi, 512Mi or 1.5G",
    URL_PATTERN: "must be an http:// or https:// URL of host[:port] without a path, e.g. http://minio:9000",
}


class SchedulingSpec(Spec):
    """Passed through to the Ray pods (head and workers) as the Kubernetes fields of the same name."""

    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the Ray pods must match.")
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Kubernetes Toleration objects, e.g. for tainted GPU nodes."
    )
    affinity: dict[str, Any] | None = Field(default=None, description="A Kubernetes Affinity object.")
    priority_class_name: str | None = Field(
        default=None, pattern=NAME_PATTERN, max_length=253, description="PriorityClass of the Ray pods."
    )


class ResourcesSpec(Spec):
    nodes: int = Field(default=1, ge=1, le=1024, description="Ray worker nodes.")
    gpus_per_node: int = Field(
        default=0, ge=0, le=16, description="GPUs per node; one training worker per GPU. 0: one CPU worker per node."
    )
    cpus_per_worker: float = Field(default=1, gt=0, le=512, description="CPUs per training worker.")
    memory_per_worker: str | None = Field(
        default=None, pattern=QUANTITY, description="Memory per worker node, a Kubernetes quantity (e.g. 16Gi)."
    )

    @property
    def workers(self) -> int:
        return self.nodes * max(self.gpus_per_node, 1)


class EarlyStoppingSpec(Spec):
    metric: str = Field(default="eval_loss", min_length=1, description="An eval metric, e.g. eval_loss, eval_accuracy.")
    mode: Literal["min", "max"] = "min"
    patience: PositiveInt = Field(default=3, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(default=0.0, ge=0, description="Smallest change that counts as improvement.")


class TrainingSpec(Spec):
    epochs: float = Field(default=1, gt=0, le=10_000, description="Passes over the training data.")
    max_steps: int | None = Field(default=None, ge=1, description="Optimizer steps; overrides epochs.")
    micro_batch_size: PositiveInt = Field(default=8, le=65_536, description="Examples per worker per forward pass.")
    gradient_accumulation_steps: PositiveInt = Field(default=1, le=65_536)
    lr: float = Field(default=2e-5, gt=0, le=10, description="Peak learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, le=10)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = Field(default=0.0, ge=0, le=1, description="Fraction of steps of linear warmup.")
    max_grad_norm: float = Field(default=1.0, ge=0, description="Gradient clipping; 0 disables it.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto", description="auto: bf16 on GPUs, fp32 on CPU."
    )
    seed: int = 42
    eval_every: int | None = Field(
        default=None, ge=1, description="Evaluate every N steps; always before and after training."
    )
    log_every: PositiveInt = Field(default=10, description="Report train metrics every N steps.")
    early_stopping: EarlyStoppingSpec | None = None

    rules = (
        Rule(
            "earlyStopping",
            "earlyStopping needs evalEvery: set training.evalEvery to evaluate every N steps",
            "!has(self.earlyStopping) || has(self.evalEvery)",
            lambda t: t.early_stopping is None or t.eval_every is not None,
        ),
    )


class CheckpointingSpec(Spec):
    every_steps: int | None = Field(
        default=None, ge=1, description="Checkpoint every N steps; a final checkpoint is always written."
    )
    keep: PositiveInt = Field(default=2, le=1000, description="Checkpoints kept in storage (newest).")
    max_failures: int = Field(
        default=3,
        ge=-1,
        le=1000,
        description="Worker failures a run recovers from (each restarts the workers from the latest "
        "checkpoint); -1: unlimited.",
    )
    grace_period_seconds: int = Field(
        default=120,
        ge=5,
        le=3600,
        description="On SIGTERM (node drain, spot reclaim, suspend) the run saves a checkpoint at the "
        "current step and stops; this is how long it may take before the process exits regardless.",
    )


class CredentialsSecret(Spec):
    name: str = Field(pattern=NAME_PATTERN, max_length=253, description="Secret in the FineTuneJob's namespace.")
    access_key_id_key: str = Field(default="AWS_ACCESS_KEY_ID", min_length=1, description="Key holding the access key id.")
    secret_access_key_key: str = Field(
        default="AWS_SECRET_ACCESS_KEY", min_length=1, description="Key holding the secret access key."
    )
    session_token_key: str | None = Field(default=None, min_length=1, description="Key holding a session token, if any.")


class StorageSpec(Spec):
    """Credentials are never part of the spec: local runs take them from the standard AWS
    environment variables (or ~/.aws), on Kubernetes the operator maps `credentialsSecret`
    to those variables. The same settings apply to s3:// model and dataset sources."""

    uri: str | None = Field(
        default=None,
        description="Where checkpoints and the export go: a local directory or s3://bucket/prefix. "
        "Default for local runs: ~/.cache/finetune/runs.",
    )
    endpoint: str | None = Field(
        default=None,
        pattern=URL_PATTERN,
        description="S3 API endpoint of an S3-compatible store (MinIO, Ceph, GCS interop), e.g. "
        "http://minio.storage:9000. Default: AWS S3.",
    )
    region: str | None = Field(default=None, min_length=1, description="S3 region, e.g. us-east-1.")
    path_style: bool | None = Field(
        default=None,
        description="Path-style addressing (endpoint/bucket/key). Default: on when endpoint is set, "
        "virtual-hosted style for AWS.",
    )
    credentials_secret: CredentialsSecret | None = Field(
        default=None, description="Kubernetes Secret with the S3 credentials (Kubernetes only)."
    )
    timeout_seconds: int = Field(default=30, ge=1, le=600, description="Connect and request timeout of one S3 call.")
    max_attempts: int = Field(
        default=8, ge=1, le=50, description="Attempts per S3 call; transient errors are retried with backoff."
    )

    rules = (
        Rule(
            "endpoint",
            "endpoint, region, pathStyle and credentialsSecret are S3 settings; set uri to s3://bucket/prefix or remove them",
            "(has(self.uri) && self.uri.startsWith('s3://')) || (!has(self.endpoint) && !has(self.region) "
            "&& !has(self.pathStyle) && !has(self.credentialsSecret))",
            lambda s: (s.uri or "").startswith("s3://")
            or (s.endpoint, s.region, s.path_style, s.credentials_secret) == (None, None, None, None),
        ),
    )

    @property
    def is_s3(self) -> bool:
        return (self.uri or "").startswith("s3://")


class OutputSpec(Spec):
    format: Literal["merged", "adapter"] = Field(
        default="merged", description="merged: full model with LoRA folded in; adapter: LoRA weights only."
    )


class FineTuneJobSpec(Spec):
    model: ModelSpec
    dataset: DatasetSpec
    method: MethodSpec = Field(default_factory=MethodSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    checkpointing: CheckpointingSpec = Field(default_factory=CheckpointingSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    # How the job runs on Kubernetes; `finetune run` ignores these.
    image: str | None = Field(
        default=None, min_length=1, description="Trainer image of the Ray pods. Default: the operator's trainer image."
    )
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    suspend: bool = Field(
        default=False, description="true stops the Ray cluster after a checkpoint; false again resumes from it."
    )
    retries: int = Field(
        default=0, ge=0, le=100,
        description="Attempts after a failed one, each on a new Ray cluster continuing from the latest checkpoint.",
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Fail the job when it has run this long (all attempts together)."
    )
    ttl_seconds_after_finished: int = Field(
        default=3600, ge=0, description="Delete the finished RayJob and its Ray cluster after this long (the FineTuneJob stays)."
    )

    rules = (
        Rule(
            "dataset",
            "sequence-classification reads textColumn and labelColumn; remove promptColumn, "
            "completionColumn and messagesColumn",
            "self.model.task != 'sequence-classification' || "
            "(!has(self.dataset.promptColumn) && !has(self.dataset.messagesColumn))",
            lambda s: s.model.task != "sequence-classification" or s.dataset.style == "text",
        ),
        Rule(
            "dataset.labelColumn",
            "labelColumn is only for sequence-classification; remove it for causal-lm",
            "self.model.task == 'sequence-classification' || !has(self.dataset.labelColumn)",
            lambda s: s.model.task == "sequence-classification" or s.dataset.label_column is None,
        ),
        Rule(
            "output.format",
            "output.format adapter needs method.type lora; use output.format merged otherwise",
            "!has(self.output) || !has(self.output.format) || self.output.format != 'adapter' "
            "|| (has(self.method) && self.method.type == 'lora')",
            lambda s: s.output.format != "adapter" or s.method.type == "lora",
        ),
        Rule(
            "training.earlyStopping.metric",
            "earlyStopping.metric must be an eval metric (eval_loss, eval_perplexity for causal-lm; "
            "eval_loss, eval_accuracy, eval_precision, eval_recall, eval_f1 for classification)",
            "!has(self.training) || !has(self.training.earlyStopping) || "
            "!has(self.training.earlyStopping.metric) || "
            "(self.model.task == 'causal-lm' ? "
            "['eval_loss', 'eval_perplexity'] : "
            "['eval_loss', 'eval_accuracy', 'eval_precision', 'eval_recall', 'eval_f1'])"
            ".exists(m, m == self.training.earlyStopping.metric)",
            lambda s: s.training.early_stopping is None
            or s.training.early_stopping.metric in eval_metrics(s.model.task),
        ),
    )

    # Fields that define what a run computes: changing them under a running job would mix
    # two different trainings in one checkpoint history, so the CRD makes them immutable.
    immutable: ClassVar[tuple[str, ...]] = (
        "model", "dataset", "method", "deepspeed", "training", "storage",
    )

    @model_validator(mode="after")
    def _fill_columns(self):
        d = self.dataset
        if self.model.task == "sequence-classification":
            d.text_column = d.text_column or "text"
            d.label_column = d.label_column or "label"
        elif d.style == "text":
            d.text_column = d.text_column or "text"
        return self


def eval_metrics(task: str) -> tuple[str, ...]:
    if task == "causal-lm":
        return ("eval_loss", "eval_perplexity")
    return ("eval_loss", "eval_accuracy", "eval_precision", "eval_recall", "eval_f1")


class ObjectMeta(BaseModel):
    """The part of metadata the tool reads; everything else passes through untouched."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=NAME_PATTERN)
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None


class Resource(BaseModel):
    """What FineTuneJob and FineTuneSweep share: identity, and the form they travel in to the
    training program."""

    model_config = ConfigDict(populate_by_name=True, extra="allow")
    api_version: Literal["finetune.dev/v1alpha1"] = Field(alias="apiVersion")
    metadata: ObjectMeta

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def run_name(self) -> str:
        """The Ray Train run every attempt continues: its storage folder. On Kubernetes the UID
        is part of it, so a deleted and re-created object starts afresh while suspends,
        retries and new Ray clusters of the same object resume."""
        uid = self.metadata.uid
        return f"{self.name}-{uid[:8]}" if uid else self.name

    def encode(self) -> str:
        """Base64 of compact JSON. Of the metadata only the identity travels: the rest
        (resourceVersion, managedFields, ...) changes with every write and would make the
        RayJob differ from itself."""
        metadata = self.metadata.model_dump(include={"name", "namespace", "uid"}, exclude_none=True)
        spec = self.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
        doc = {"apiVersion": API_VERSION, "kind": self.kind, "metadata": metadata, "spec": spec}
        return base64.b64encode(json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()).decode()


class FineTuneJob(Resource):
    kind: Literal["FineTuneJob"]
    spec: FineTuneJobSpec


def dump_spec(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The wire form of a spec: camelCase, defaults filled, unset optionals omitted."""
    return spec.model_dump(mode="json", by_alias=True, exclude_none=True)


def decode_job(text: str) -> FineTuneJob:
    return parse_job(json.loads(base64.b64decode(text)), "--job")


def _error_lines(err: ValidationError, prefix: str) -> list[str]:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        cause = e.get("ctx", {}).get("error")
        if isinstance(cause, FieldError):
            lines.append(f"{path}.{cause.field}: {cause}")
            continue
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = _unknown_field_message(e["loc"])
        elif e["type"] == "string_pattern_mismatch" and e["ctx"]["pattern"] in PATTERN_HINTS:
            msg = f"{PATTERN_HINTS[e['ctx']['pattern']]} (got {e['input']!r})"
        elif e["type"] == "string_too_long" and tuple(e["loc"]) == ("metadata", "name"):
            msg = f"{msg}: names of the RayJob and storage paths derive from it"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] in ("literal_error", "enum"):
            msg = f"{msg} (got {e['input']!r})"
        elif "input" in e and not isinstance(e["input"], dict | list):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"{path}: {msg}")
    return lines


def _unknown_field_message(loc: tuple[Any, ...]) -> str:
    """Name the fields allowed where an unknown one was found, and the likely intended one."""
    *parents, name = loc
    model: Any = FineTuneJob if parents[:1] == ["spec"] else FineTuneJobSpec
    for part in parents:
        field = _field_by_alias(model, part) if isinstance(part, str) else None
        subs = _spec_types(field.annotation) if field is not None else []
        if not subs:
            return "unknown field"
        model = subs[0]
    allowed = [f.alias or n for n, f in model.model_fields.items()]
    close = difflib.get_close_matches(str(name), allowed, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown field; {hint}allowed here: {', '.join(allowed)}"


def _field_by_alias(model: type[BaseModel], key: str) -> Any:
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            return field
    return None


def parse_spec(data: Any, source: str = "spec") -> FineTuneJobSpec:
    try:
        return FineTuneJobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(source, _error_lines(err, "spec")) from None


def parse_job(doc: Any, source: str = "manifest") -> FineTuneJob:
    if not isinstance(doc, dict):
        raise SpecError(source, [f"expected a FineTuneJob object, got {type(doc).__name__}"])
    # Checked first: the rest of the document means nothing for another kind of object.
    wrong = [
        f"{key}: must be {want} (got {doc.get(key)!r})"
        for key, want in (("apiVersion", API_VERSION), ("kind", KIND))
        if doc.get(key) != want
    ]
    if wrong:
        raise SpecError(source, wrong)
    try:
        return FineTuneJob.model_validate(doc)
    except ValidationError as err:
        raise SpecError(source, _error_lines(err, "")) from None


def load_manifests(path: str | Path, parse: Callable[[Any, str], Any] = parse_job) -> list[FineTuneJob]:
    """Every FineTuneJob in a YAML file (multi-document allowed), or whatever `parse` makes of
    each document. Raises SpecError naming each bad field; an empty file is an error too."""
    path = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as err:
        raise SpecError(str(path), [f"cannot read: {err}"]) from None
    if not docs:
        raise SpecError(str(path), ["no FineTuneJob in file"])
    jobs, errors = [], []
    for i, doc in enumerate(docs):
        where = str(path) if len(docs) == 1 else f"{path}[{i}]"
        try:
            jobs.append(parse(doc, where))
        except SpecError as err:
            errors.extend(err.errors if len(docs) == 1 else [f"[{i}] {e}" for e in err.errors])
    if errors:
        raise SpecError(str(path), errors)
    return jobs


def iter_rules(model: type[Spec]) -> Iterable[tuple[type[Spec], Rule]]:
    """Every (model, rule) reachable from `model`, for the CRD generator and its tests."""
    for rule in model.rules:
        yield model, rule
    for field in model.model_fields.values():
        for sub in _spec_types(field.annotation):
            yield from iter_rules(sub)


def _spec_types(annotation: Any) -> list[type[Spec]]:
    if isinstance(annotation, type) and issubclass(annotation, Spec):
        return [annotation]
    return [t for arg in getattr(annotation, "__args__", ()) for t in _spec_types(arg)]


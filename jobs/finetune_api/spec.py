"""FineTuneJob `spec` models.

Every cross-field rule is declared once as a `Rule`: Python evaluates `holds`, the CRD
carries `cel`, and both report the same field and message, so `finetune validate` and
the Kubernetes apiserver reject the same specs with the same words.
"""

from __future__ import annotations

import base64
import difflib
import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"

NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # a DNS-1123 label: names of Secrets, PriorityClasses
# Our objects' names become RayJob names (a sweep's: <name>-sweep), which KubeRay takes only as
# DNS-1035 labels (starting with a letter) of at most 47 characters.
OBJECT_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
MAX_NAME_LENGTH = 41


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


class Model(BaseModel):
    """Base of every API model, spec and status: camelCase on the wire (snake_case accepted
    too), each model a node of the generated CRD schema."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, validate_default=True)
    rules: ClassVar[tuple[Rule, ...]] = ()

    def wire(self) -> dict[str, Any]:
        """The JSON form: camelCase, unset optionals omitted."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class Spec(Model):
    """Base of every spec model: unknown fields rejected, cross-field rules checked."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _check_rules(self):
        for rule in self.rules:
            if not rule.holds(self):
                raise FieldError(rule.field, rule.message)
        return self


PositiveInt = Annotated[int, Field(ge=1)]


# A URI scheme (ftp://, https://, gs://...): of them only s3:// is a source the program reads.
SCHEME = r"^[a-zA-Z][a-zA-Z0-9+.-]*://"
SOURCE_RULE = (  # what a model source may be (CEL over `self.<field>`, and the same test in Python)
    "!self.{f}.matches('%s') && (!self.{f}.startsWith('package:') || self.{f}.size() > 8) || self.{f}.startsWith('s3://')" % SCHEME,
    lambda source: (not re.match(SCHEME, source) and source != "package:") or source.startswith("s3://"),
)
SOURCE_MESSAGE = "must be a Hugging Face id (org/name), s3://bucket/path, a local path or package:<distribution>"
GENERATIVE = ("causal-lm", "preference")  # tasks of a causal language model: no labels
_CLASSIFICATION_METRICS = ("eval_loss", "eval_accuracy", "eval_precision", "eval_recall", "eval_f1")
EVAL_METRICS = {  # what each task's evaluation reports: what early stopping and sweeps may optimise
    "causal-lm": ("eval_loss", "eval_perplexity"),
    "preference": ("eval_loss", "eval_rewards_chosen", "eval_rewards_rejected", "eval_rewards_margin", "eval_rewards_accuracy"),
    "sequence-classification": _CLASSIFICATION_METRICS,
    "image-classification": _CLASSIFICATION_METRICS,
}


class ModelSpec(Spec):
    source: str = Field(
        min_length=1,
        description="Pretrained model: a Hugging Face id (org/name), s3://bucket/path, a local "
        "directory, or package:<python-distribution> for a model shipped inside a Python package.",
    )
    task: Literal["causal-lm", "preference", "sequence-classification", "image-classification"] = Field(
        description="causal-lm: supervised fine-tuning of a language model; preference: preference tuning of a language "
        "model on chosen/rejected pairs (DPO, training.preference); sequence-classification: one label per text; "
        "image-classification: one label per image."
    )
    architecture: str | None = Field(
        default=None, min_length=1, max_length=128, pattern=r"^[a-z0-9_.]+$",
        description="image-classification: a timm architecture (e.g. efficientnet_lite0, resnet50); source is then its "
        "weights: a .pth/.safetensors file, a timm folder, or package:<distribution> shipping one. Without it, source is "
        "a Hugging Face image-classification model.",
    )
    # Bounded so that the CRD's uniqueness rule (quadratic) stays within the apiserver's
    # CEL cost budget; more classes than this: integer labels and numLabels.
    labels: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        default=None,
        min_length=2,
        max_length=256,
        description="Class names in id order (classification); written to config.id2label. "
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
    attention: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field(
        default="auto", description="Attention kernel. auto: flash_attention_2 when flash-attn is installed and on GPU, else sdpa.",
    )
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
        Rule("source", f"source {SOURCE_MESSAGE}", SOURCE_RULE[0].format(f="source"), lambda m: SOURCE_RULE[1](m.source)),
        Rule(
            "labels",
            "classification needs labels (class names) or numLabels",
            f"self.task in {list(GENERATIVE)} || has(self.labels) || has(self.numLabels)",
            lambda m: m.task in GENERATIVE or bool(m.labels) or m.num_labels is not None,
        ),
        Rule(
            "labels",
            "labels and numLabels are only for classification; remove them for causal-lm and preference",
            f"!(self.task in {list(GENERATIVE)}) || (!has(self.labels) && !has(self.numLabels))",
            lambda m: m.task not in GENERATIVE or (m.labels is None and m.num_labels is None),
        ),
        Rule(
            "architecture",
            "architecture is for image-classification (a timm architecture); remove it",
            "self.task == 'image-classification' || !has(self.architecture)",
            lambda m: m.task == "image-classification" or m.architecture is None,
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

    @property
    def classifies(self) -> bool:
        return self.task not in GENERATIVE


FORMATS = ("jsonl", "csv", "parquet")


class DatasetSpec(Spec):
    train: str = Field(
        min_length=1, description="Training file (jsonl, csv, parquet), or for images also a folder with one sub-folder "
        "of images per class: local path or s3:// URI.",
    )
    validation: str | None = Field(default=None, description="Validation file (same format).")
    validation_split: float | None = Field(
        default=None, gt=0, lt=1, description="Fraction of train held out for validation."
    )
    test: str | None = Field(default=None, description="Test file (same format): evaluated once, with the final model.")
    test_split: float | None = Field(default=None, gt=0, lt=1, description="Fraction of train held out for the test.")
    seed: int = Field(default=42, description="Seed of the validation split and shuffling.")
    format: Literal["auto", "jsonl", "csv", "parquet"] = Field(
        default="auto", description="auto: from the file extension."
    )
    text_column: str | None = Field(default=None, description="Plain text (causal-lm) or the text to classify.")
    prompt_column: str | None = Field(
        default=None, description="Prompt; loss is masked on it (causal-lm). preference: default prompt; a string, or "
        "chat messages (optional then: the messages chosen and rejected share).",
    )
    completion_column: str | None = Field(default=None, description="Completion trained on (causal-lm).")
    chosen_column: str | None = Field(
        default=None, description="preference: the preferred completion, a string or assistant messages. Default: chosen.",
    )
    rejected_column: str | None = Field(
        default=None, description="preference: the dispreferred completion, like chosen. Default: rejected.",
    )
    messages_column: str | None = Field(
        default=None,
        description="Chat messages rendered with the tokenizer's chat template; loss only on "
        "assistant turns (causal-lm).",
    )
    label_column: str | None = Field(default=None, description="Label: a class name or id (classification).")
    image_column: str | None = Field(
        default=None, description="image-classification from a table: an image path (relative to the table's folder, or "
        "s3://) or the image's bytes. Default: image.",
    )
    augment: bool = Field(default=True, description="image-classification: random resized crop and horizontal flip in training.")
    image_size: int | None = Field(
        default=None, ge=16, le=4096, description="image-classification: input side in pixels. Default: the model's own.",
    )
    max_length: int = Field(default=512, ge=8, le=131_072, description="Tokens per example (truncated); with packing, per packed row.")
    packing: bool = Field(
        default=False,
        description="causal-lm: pack examples into rows of maxLength tokens with no attention across examples "
        "(position ids restart per example); no compute spent on padding.",
    )

    rules = (
        *(Rule(
            f, f"{f} must be a local path or s3://bucket/key",
            f"!has(self.{f}) || !self.{f}.matches('{SCHEME}') || self.{f}.startsWith('s3://')",
            lambda d, f=f: not re.match(SCHEME, getattr(d, f) or "") or getattr(d, f).startswith("s3://"),
        ) for f in ("train", "validation", "test")),
        Rule(
            "validationSplit",
            "set either validation (a file) or validationSplit (a fraction), not both",
            "!has(self.validation) || !has(self.validationSplit)",
            lambda d: d.validation is None or d.validation_split is None,
        ),
        Rule(
            "testSplit",
            "set either test (a file) or testSplit (a fraction), not both",
            "!has(self.test) || !has(self.testSplit)",
            lambda d: d.test is None or d.test_split is None,
        ),
        Rule(
            "testSplit",
            "validationSplit and testSplit together must leave rows to train on",
            "!has(self.validationSplit) || !has(self.testSplit) || self.validationSplit + self.testSplit < 1.0",
            lambda d: d.validation_split is None or d.test_split is None or d.validation_split + d.test_split < 1,
        ),
        Rule(
            "completionColumn",
            "completionColumn needs promptColumn",
            "!has(self.completionColumn) || has(self.promptColumn)",
            lambda d: d.completion_column is None or d.prompt_column is not None,
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
    OBJECT_NAME_PATTERN: "must be a DNS-1035 label: lowercase letters, digits and '-', starting with a letter and "
    "ending with a letter or digit (KubeRay's rule for the RayJob named after it)",
    QUANTITY: "must be a Kubernetes quantity such as 16Gi, 512Mi or 1.5G",
    URL_PATTERN: "must be an http:// or https:// URL of host[:port] without a path, e.g. http://minio:9000",
}


class Named(Spec):
    """A Kubernetes object in a list, identified by its name (EnvVar, Volume,
    LocalObjectReference): the name is checked, every other field reaches the pod as written."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=253)


class VolumeMount(Named):
    mount_path: str = Field(min_length=1, description="Where the volume appears in the container.")


# Names the builders give the Ray pods: a pod template may not take them.
RESERVED_VOLUMES = ("shm", "finetune-report")
RESERVED_LABEL_PREFIXES = ("finetune.dev/", "ray.io/", "app.kubernetes.io/managed-by")


class PodTemplateSpec(Spec):
    """Merged onto every Ray pod (head and workers), like KubeRay's user pod templates: what a
    platform needs to give the pods (an identity, secrets, volumes). The restricted security
    context stays unless securityContext replaces it."""

    # Bounded, as are the lists, to keep the CRD's rules within the apiserver's CEL cost budget.
    labels: dict[str, str] = Field(default_factory=dict, max_length=64, description="Added to the pods' labels.")
    annotations: dict[str, str] = Field(default_factory=dict, max_length=64, description="Added to the pods' annotations.")
    service_account_name: str | None = Field(
        default=None, min_length=1, max_length=253,
        description="ServiceAccount of the Ray pods, e.g. one bound to a cloud role (IRSA, Workload Identity).",
    )
    image_pull_secrets: list[Named] = Field(default_factory=list, max_length=16, description="Secrets for pulling the trainer image.")
    env: list[Named] = Field(
        default_factory=list, max_length=256,
        description="Kubernetes EnvVars for the Ray containers, e.g. {name: HF_TOKEN, valueFrom: {secretKeyRef: ...}}.",
    )
    env_from: list[dict[str, Any]] = Field(default_factory=list, max_length=64, description="Kubernetes EnvFromSources (whole Secrets or ConfigMaps).")
    volumes: list[Named] = Field(default_factory=list, max_length=64, description="Kubernetes Volumes added to the pods.")
    volume_mounts: list[VolumeMount] = Field(default_factory=list, max_length=64, description="VolumeMounts of those volumes in the Ray containers.")
    security_context: dict[str, Any] | None = Field(
        default=None, description="Replaces the Ray containers' restricted SecurityContext (runAsNonRoot, no privilege "
        "escalation, no capabilities, RuntimeDefault seccomp).",
    )
    pod_security_context: dict[str, Any] | None = Field(default=None, description="The pods' PodSecurityContext (e.g. fsGroup).")

    rules = (
        Rule("env", "env names starting with FINETUNE_ are the operator's; use another name",
             "!has(self.env) || self.env.all(e, !e.name.startsWith('FINETUNE_'))",
             lambda t: not any(e.name.startswith("FINETUNE_") for e in t.env)),
        Rule("volumes", f"volume names {', '.join(RESERVED_VOLUMES)} are the operator's; use another name",
             "!has(self.volumes) || self.volumes.all(v, !(v.name in [" + ", ".join(f"'{n}'" for n in RESERVED_VOLUMES) + "]))",
             lambda t: not any(v.name in RESERVED_VOLUMES for v in t.volumes)),
        Rule("volumeMounts", "every volumeMount names a volume of podTemplate.volumes",
             "!has(self.volumeMounts) || self.volumeMounts.all(m, has(self.volumes) && self.volumes.exists(v, v.name == m.name))",
             lambda t: all(any(v.name == m.name for v in t.volumes) for m in t.volume_mounts)),
        Rule("volumeMounts", "/dev/shm is the operator's memory volume; mount elsewhere",
             "!has(self.volumeMounts) || self.volumeMounts.all(m, m.mountPath != '/dev/shm')",
             lambda t: all(m.mount_path != "/dev/shm" for m in t.volume_mounts)),
        Rule("labels", "labels under finetune.dev/, ray.io/ and app.kubernetes.io/managed-by select the job's pods; use other keys",
             "!has(self.labels) || self.labels.all(k, " + " && ".join(f"!k.startsWith('{p}')" for p in RESERVED_LABEL_PREFIXES) + ")",
             lambda t: not any(k.startswith(RESERVED_LABEL_PREFIXES) for k in t.labels)),
    )


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


class HeadResourcesSpec(Spec):
    """The Ray head runs Ray's control processes and the training driver, no training work. The
    defaults leave a small node's CPUs to the workers; the memory holds the GCS, the dashboard,
    Ray Train's controller and the driver (2Gi was measured too little: Ray's memory monitor
    killed them on a real node)."""

    cpu: str = Field(
        default="250m", pattern=QUANTITY,
        description="CPU request of the Ray head. No limit: its bursts (start-up, imports) use idle CPU instead of being throttled.",
    )
    memory: str = Field(default="4Gi", pattern=QUANTITY, description="Memory request and limit of the Ray head.")


class ResourcesSpec(Spec):
    nodes: int = Field(default=1, ge=1, le=1024, description="Ray worker nodes.")
    gpus_per_node: int = Field(
        default=0, ge=0, le=16, description="GPUs per node; one training worker per GPU. 0: one CPU worker per node."
    )
    cpus_per_worker: float = Field(default=1, gt=0, le=512, description="CPUs per training worker: requested, not limited (no CFS throttling; idle CPU is used).")
    memory_per_worker: str | None = Field(
        default=None, pattern=QUANTITY, description="Memory per worker node, a Kubernetes quantity (e.g. 16Gi)."
    )
    workers_per_node: PositiveInt = Field(
        default=1, le=256, description="CPU training workers per node when gpusPerNode is 0 (with GPUs: one per GPU).",
    )
    head: HeadResourcesSpec = Field(default_factory=HeadResourcesSpec, description="The Ray head pod (no training work runs there).")

    rules = (
        Rule(
            "workersPerNode",
            "workersPerNode is for CPU workers; with gpusPerNode there is one worker per GPU",
            "!has(self.workersPerNode) || self.workersPerNode == 1 || !has(self.gpusPerNode) || self.gpusPerNode == 0",
            lambda r: r.workers_per_node == 1 or r.gpus_per_node == 0,
        ),
    )

    @property
    def per_node(self) -> int:
        """Training workers on each node."""
        return self.gpus_per_node or self.workers_per_node

    @property
    def workers(self) -> int:
        return self.nodes * self.per_node


class EarlyStoppingSpec(Spec):
    metric: str = Field(default="eval_loss", min_length=1, description="An eval metric, e.g. eval_loss, eval_accuracy.")
    mode: Literal["min", "max"] = "min"
    patience: PositiveInt = Field(default=3, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(default=0.0, ge=0, description="Smallest change that counts as improvement.")
    restore_best: bool = Field(
        default=False, description="Export the model of the best evaluation (its checkpoint is kept) instead of the last.",
    )


class PreferenceSpec(Spec):
    algorithm: Literal["dpo"] = Field(default="dpo", description="dpo: Direct Preference Optimization.")
    loss: Literal["sigmoid", "ipo"] = Field(
        default="sigmoid", description="sigmoid: the DPO paper's -log σ(β·margin); ipo: IPO's squared loss on "
        "length-averaged log-probabilities.",
    )
    beta: float = Field(default=0.1, gt=0, le=100, description="How far the model may move from the reference: larger "
                        "is closer.")
    label_smoothing: float = Field(
        default=0.0, ge=0, le=1, description="sigmoid: the assumed fraction of pairs whose preference is wrong "
        "(conservative DPO), at most 0.5.",
    )
    reference_model: str | None = Field(
        default=None, min_length=1, description="The model the policy is compared with, a source like model.source. "
        "Default: the starting model (with LoRA: the model with its adapters off, no second copy).",
    )

    rules = (
        # A rule, not a bound: the apiserver compares an integer value (0) with bounds cut to integers (crd.py).
        Rule("labelSmoothing", "labelSmoothing must be at most 0.5 (the fraction of pairs assumed wrong)",
             "!has(self.labelSmoothing) || double(self.labelSmoothing) <= 0.5", lambda p: p.label_smoothing <= 0.5),
        Rule("referenceModel", f"referenceModel {SOURCE_MESSAGE}", f"!has(self.referenceModel) || ({SOURCE_RULE[0].format(f='referenceModel')})",
             lambda p: p.reference_model is None or SOURCE_RULE[1](p.reference_model)),
    )


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
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass instead of keeping them: much less memory, ~30 % more compute.",
    )
    layerwise_lr_decay: float | None = Field(
        default=None, gt=0, le=1,
        description="Discriminative learning rates: each block below the top one gets lr × decay^depth (depth 1 for the "
        "block under the top one); what is above the blocks (the head) gets lr, what is below them (embeddings, a CNN's "
        "stem) lr × decay^blocks.",
    )
    label_smoothing: float = Field(default=0.0, ge=0, lt=1, description="Classification: label smoothing of the training loss.")
    preference: PreferenceSpec | None = Field(default=None, description="task preference: the algorithm and its settings.")

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


class MlflowCredentialsSecret(Spec):
    name: str = Field(pattern=NAME_PATTERN, max_length=253, description="Secret in the FineTuneJob's namespace.")
    token_key: str = Field(default="MLFLOW_TRACKING_TOKEN", min_length=1, description="Key holding a bearer token, if any.")
    username_key: str = Field(default="MLFLOW_TRACKING_USERNAME", min_length=1, description="Key holding the user, if any.")
    password_key: str = Field(default="MLFLOW_TRACKING_PASSWORD", min_length=1, description="Key holding the password, if any.")


class MlflowSpec(Spec):
    """Credentials are never part of the spec: local runs read MLFLOW_TRACKING_TOKEN (or
    MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD) from the environment; on Kubernetes
    the operator maps credentialsSecret's keys to those variables."""

    tracking_uri: str = Field(min_length=1, description="The MLflow tracking server, e.g. http://mlflow.mlops:5000.")
    experiment: str = Field(default="finetune", min_length=1, max_length=500, description="Experiment of the run (created if missing).")
    run_name: str | None = Field(default=None, min_length=1, max_length=250, description="Default: the job's run name.")
    registered_model: str | None = Field(
        default=None, min_length=1, max_length=250,
        description="Register the export as a new version of this model in the MLflow Model Registry (its source: the export in storage).",
    )
    credentials_secret: MlflowCredentialsSecret | None = Field(default=None, description="Kubernetes Secret with the MLflow credentials.")

    rules = (
        Rule("trackingUri", "trackingUri must be an http(s):// URL of an MLflow server",
             "self.trackingUri.startsWith('http://') || self.trackingUri.startsWith('https://')",
             lambda m: m.tracking_uri.startswith(("http://", "https://"))),
    )


class TrackingSpec(Spec):
    mlflow: MlflowSpec | None = Field(default=None, description="Log params, metrics, artifacts and the model to MLflow.")
    tensorboard: bool = Field(default=False, description="Write TensorBoard event files under <storage>/<run>/tensorboard/.")


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
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    # How the job runs on Kubernetes; `finetune run` ignores these.
    image: str | None = Field(
        default=None, min_length=1, description="Trainer image of the Ray pods. Default: the operator's trainer image."
    )
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    pod_template: PodTemplateSpec = Field(default_factory=PodTemplateSpec, description="Merged onto every Ray pod.")
    queue_name: str | None = Field(
        default=None, pattern=NAME_PATTERN, max_length=63,
        description="A Kueue LocalQueue in the job's namespace: the job waits Suspended until Kueue admits it.",
    )
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
        default=0, ge=0, description="Keep the finished job's Ray cluster this long (its logs, its dashboard) before KubeRay "
        "deletes it; meanwhile its pods hold their nodes' CPUs and GPUs. The RayJob and the FineTuneJob stay.",
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
            "dataset.completionColumn",
            "causal-lm with promptColumn needs completionColumn",
            "self.model.task != 'causal-lm' || has(self.dataset.promptColumn) == has(self.dataset.completionColumn)",
            lambda s: s.model.task != "causal-lm" or (s.dataset.prompt_column is None) == (s.dataset.completion_column is None),
        ),
        Rule(
            "dataset",
            "preference reads promptColumn, chosenColumn and rejectedColumn; remove textColumn, completionColumn, "
            "messagesColumn and labelColumn",
            "self.model.task != 'preference' || (!has(self.dataset.textColumn) && !has(self.dataset.completionColumn) && "
            "!has(self.dataset.messagesColumn) && !has(self.dataset.labelColumn))",
            lambda s: s.model.task != "preference" or (s.dataset.text_column, s.dataset.completion_column,
                                                        s.dataset.messages_column, s.dataset.label_column) == (None,) * 4,
        ),
        Rule(
            "dataset.chosenColumn",
            "chosenColumn and rejectedColumn are for task preference; remove them",
            "self.model.task == 'preference' || (!has(self.dataset.chosenColumn) && !has(self.dataset.rejectedColumn))",
            lambda s: s.model.task == "preference" or (s.dataset.chosen_column is None and s.dataset.rejected_column is None),
        ),
        Rule(
            "training.preference",
            "training.preference is for task preference; remove it",
            "self.model.task == 'preference' || !has(self.training) || !has(self.training.preference)",
            lambda s: s.model.task == "preference" or s.training.preference is None,
        ),
        Rule(
            "dataset.packing",
            "packing is for causal-lm; remove it",
            "self.model.task == 'causal-lm' || !has(self.dataset.packing) || !self.dataset.packing",
            lambda s: s.model.task == "causal-lm" or not s.dataset.packing,
        ),
        Rule(
            "dataset",
            "image-classification reads imageColumn and labelColumn; remove textColumn, promptColumn, completionColumn "
            "and messagesColumn",
            "self.model.task != 'image-classification' || (!has(self.dataset.textColumn) && "
            "!has(self.dataset.promptColumn) && !has(self.dataset.messagesColumn))",
            lambda s: s.model.task != "image-classification" or (s.dataset.text_column, s.dataset.prompt_column,
                                                                  s.dataset.messages_column) == (None, None, None),
        ),
        Rule(
            "dataset.imageColumn",
            "imageColumn, augment and imageSize are for image-classification; remove them",
            "self.model.task == 'image-classification' || (!has(self.dataset.imageColumn) && !has(self.dataset.imageSize))",
            lambda s: s.model.task == "image-classification" or (s.dataset.image_column is None and s.dataset.image_size is None),
        ),
        Rule(
            "dataset.labelColumn",
            "labelColumn is only for classification; remove it for causal-lm",
            "self.model.task != 'causal-lm' || !has(self.dataset.labelColumn)",
            lambda s: s.model.task != "causal-lm" or s.dataset.label_column is None,
        ),
        Rule(
            "training.labelSmoothing",
            "labelSmoothing is for classification; remove it (preference: training.preference.labelSmoothing)",
            f"!(self.model.task in {list(GENERATIVE)}) || !has(self.training) || !has(self.training.labelSmoothing) "
            "|| self.training.labelSmoothing == 0.0",
            lambda s: s.model.task not in GENERATIVE or s.training.label_smoothing == 0,
        ),
        Rule(
            "method.lora.targetModules",
            "LoRA on an image model needs method.lora.targetModules (e.g. conv_pwl, the 1x1 convolutions of "
            "EfficientNet, or qkv for a vision transformer): peft has no default for it",
            "self.model.task != 'image-classification' || !has(self.method) || self.method.type != 'lora' "
            "|| (has(self.method.lora) && has(self.method.lora.targetModules))",
            lambda s: s.model.task != "image-classification" or s.method.type != "lora"
            or (s.method.lora is not None and s.method.lora.target_modules is not None),
        ),
        Rule(
            "output.format",
            "output.format adapter needs method.type lora; use output.format merged otherwise",
            "!has(self.output) || !has(self.output.format) || self.output.format != 'adapter' "
            "|| (has(self.method) && self.method.type == 'lora')",
            lambda s: s.output.format != "adapter" or s.method.type == "lora",
        ),
        Rule(
            "training.earlyStopping",
            "earlyStopping (and restoreBest) judge evaluations of validation data: set dataset.validation or "
            "dataset.validationSplit, or remove training.earlyStopping",
            "!has(self.training) || !has(self.training.earlyStopping) || has(self.dataset.validation) "
            "|| has(self.dataset.validationSplit)",
            lambda s: s.training.early_stopping is None or s.dataset.validation is not None or s.dataset.validation_split is not None,
        ),
        Rule(
            "training.earlyStopping.metric",
            "earlyStopping.metric must be an eval metric of the task ("
            + "; ".join(f"{task}: {', '.join(metrics)}" for task, metrics in EVAL_METRICS.items()) + ")",
            "!has(self.training) || !has(self.training.earlyStopping) || !has(self.training.earlyStopping.metric) || "
            f"self.training.earlyStopping.metric in {json.dumps({k: list(v) for k, v in EVAL_METRICS.items()})}[self.model.task]",
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
        elif self.model.task == "image-classification":
            d.image_column = d.image_column or "image"
            d.label_column = d.label_column or "label"
        elif self.model.task == "preference":
            d.prompt_column = d.prompt_column or "prompt"
            d.chosen_column = d.chosen_column or "chosen"
            d.rejected_column = d.rejected_column or "rejected"
        elif d.style == "text":
            d.text_column = d.text_column or "text"
        return self


def eval_metrics(task: str) -> tuple[str, ...]:
    return EVAL_METRICS[task]


class ObjectMeta(BaseModel):
    """The part of metadata the tool reads; everything else passes through untouched."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=OBJECT_NAME_PATTERN)
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


R = TypeVar("R", bound=Resource)


class FineTuneJob(Resource):
    kind: Literal["FineTuneJob"]
    spec: FineTuneJobSpec


def dump_spec(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The wire form of a spec: camelCase, defaults filled, unset optionals omitted."""
    return spec.model_dump(mode="json", by_alias=True, exclude_none=True)


def decode_job(text: str) -> FineTuneJob:
    return parse_job(json.loads(base64.b64decode(text)), "--job")


def _error_lines(err: ValidationError, root: type[BaseModel], prefix: str = "") -> list[str]:
    """`path: message` lines, each naming the field; `root` is the model validated, `prefix`
    the path it sits at."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        cause = e.get("ctx", {}).get("error")
        if isinstance(cause, FieldError):
            lines.append(f"{path}.{cause.field}: {cause}")
            continue
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = _unknown_field_message(root, e["loc"])
        elif e["type"] == "string_pattern_mismatch" and e["ctx"]["pattern"] in PATTERN_HINTS:
            msg = f"{PATTERN_HINTS[e['ctx']['pattern']]} (got {e['input']!r})"
        elif e["type"] == "string_too_long" and tuple(e["loc"]) == ("metadata", "name"):
            msg = f"{msg}: the RayJob's name derives from it (KubeRay takes at most 47 characters; a sweep's adds -sweep)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] in ("literal_error", "enum"):
            msg = f"{msg} (got {e['input']!r})"
        elif "input" in e and not isinstance(e["input"], dict | list):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"{path}: {msg}")
    return lines


def _unknown_field_message(model: Any, loc: tuple[Any, ...]) -> str:
    """Name the fields allowed where an unknown one was found, and the likely intended one."""
    *parents, name = loc
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
        raise SpecError(source, _error_lines(err, FineTuneJobSpec, "spec")) from None


def parse_resource(cls: type[R], doc: Any, source: str = "manifest") -> R:
    """A FineTuneJob or FineTuneSweep (`cls`) from a manifest; SpecError naming each bad field."""
    kind = get_args(cls.model_fields["kind"].annotation)[0]
    if not isinstance(doc, dict):
        raise SpecError(source, [f"expected a {kind} object, got {type(doc).__name__}"])
    # Checked first: the rest of the document means nothing for another kind of object.
    wrong = [
        f"{key}: must be {want} (got {doc.get(key)!r})"
        for key, want in (("apiVersion", API_VERSION), ("kind", kind))
        if doc.get(key) != want
    ]
    if wrong:
        raise SpecError(source, wrong)
    try:
        return cls.model_validate(doc)
    except ValidationError as err:
        raise SpecError(source, _error_lines(err, cls)) from None


def parse_job(doc: Any, source: str = "manifest") -> FineTuneJob:
    return parse_resource(FineTuneJob, doc, source)


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


def _spec_types(annotation: Any) -> list[type[Model]]:
    """The API models an annotation refers to (X, X | None, list[X], dict[str, X])."""
    if isinstance(annotation, type) and issubclass(annotation, Model):
        return [annotation]
    return [t for arg in getattr(annotation, "__args__", ()) for t in _spec_types(arg)]


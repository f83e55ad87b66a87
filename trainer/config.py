"""The one typed training config: a YAML file plus ``--set a.b=c`` overrides.

``TrainConfig`` is the single truth for training settings.  The trainer loads
it in every pod, ``mfrctl`` validates it before anything is launched, and the
chart's ``values.schema.json`` is generated from it.  This module stays
torch-free so the CLI can import it.
"""

from __future__ import annotations

import math
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .credentials import check_storage_options, credential_paths, redact

# The iResNet family's shape, torch-free so that mfrctl plan can count it
# (trainer/models.py builds it).
STAGE_WIDTHS = (64, 128, 256, 512)
INPUT_SIZE = 112
BACKBONE_DEPTHS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (1, 1, 1, 1),
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
    # The seed's student and teachers ("ResNet240", "ResNet600", "ResNet1.2K").
    "r240": (3, 25, 88, 3),
    "r600": (3, 70, 220, 3),
    "r1200": (3, 80, 512, 3),
}
# "tiny" exists for CPU tests and the synthetic demo: still every part of a
# real iResNet, but with 4/8/16/32 channels.  Its cost is dominated by the
# stem and first block at full 112x112 resolution, which no depth setting
# removes; halving the width roughly doubles its speed (about 145 samples/s
# for a batch-64 SGD step on one core, against about 65 at width 0.125).
DEFAULT_WIDTHS: dict[str, float] = {"tiny": 0.0625}
BACKBONES = (*BACKBONE_DEPTHS, "custom")


def backbone_layers(name: str, layers: list[int] | tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Blocks per stage of a named iResNet, or ``layers`` for "custom"; a ValueError names the mistake."""
    if name == "custom":
        if layers is None:
            raise ValueError("backbone 'custom' needs layers, e.g. layers: [3, 25, 88, 3]")
        if len(layers) != len(STAGE_WIDTHS) or min(layers) < 1:
            raise ValueError(
                f"layers must be {len(STAGE_WIDTHS)} stage depths >= 1, e.g. [3, 25, 88, 3], got {list(layers)}"
            )
        return tuple(layers)
    if name not in BACKBONE_DEPTHS:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")
    if layers is not None:
        raise ValueError(f"layers is only used with backbone 'custom' (backbone is {name!r})")
    return BACKBONE_DEPTHS[name]


DEMO_CONFIG = "synthetic-demo.yaml"
# A checkpoint's directory under its root (trainer/storage.py writes and lists them); checkpoint.resume names one.
STEP_DIR = re.compile(r"^step-(\d+)$")
# Overrides metrics.port for one pod: mfrctl train gives each emulated node its own (trainer/metrics.py reads it).
METRICS_PORT_ENV = "MFR_METRICS_PORT"


class ConfigError(ValueError):
    """A user mistake in the config: reported as one line, exit code 2 (URL user info redacted)."""

    def __init__(self, message: str = "") -> None:
        super().__init__(redact(str(message)))


# fsspec/s3fs options of a URL: never a credential, at any depth (see credentials).
StorageOptions = Annotated[dict[str, Any], AfterValidator(check_storage_options)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ArchitectureConfig(_Section):
    """An iResNet's shape: what a checkpoint's backbone tensors must match (the student's, or the teacher's)."""

    backbone: Literal[BACKBONES] = Field("r50", description="iResNet depth, or 'custom' with layers")
    layers: list[int] | None = Field(
        None, min_length=4, max_length=4, description="stage depths for backbone=custom, e.g. [3, 25, 88, 3]"
    )
    width: float | None = Field(None, gt=0, description="channel multiplier; null = the backbone's default")
    embedding_size: int = Field(512, ge=1)

    @model_validator(mode="after")
    def _layers_match_backbone(self) -> ArchitectureConfig:
        backbone_layers(self.backbone, self.layers)
        return self


class ModelConfig(ArchitectureConfig):
    """The data-parallel backbone (iResNet family) and how it trains."""

    dropout: float = Field(0.0, ge=0, lt=1)
    activation_checkpointing: Literal["none", "stage", "block"] = Field(
        "none",
        description="recompute activations during backward instead of keeping them: per iResNet stage, "
        "or per segment of checkpoint_every blocks (block); trades compute for memory",
    )
    checkpoint_every: int = Field(
        1, ge=1, description="blocks per recomputed segment with activation_checkpointing: block"
    )

    @model_validator(mode="after")
    def _checkpoint_every_needs_block(self) -> ModelConfig:
        if self.checkpoint_every != 1 and self.activation_checkpointing != "block":
            raise ValueError(
                f"model.checkpoint_every ({self.checkpoint_every}) needs model.activation_checkpointing: block "
                f"(it is {self.activation_checkpointing})"
            )
        return self


class HeadConfig(_Section):
    """The model-parallel margin softmax head ("Partial FC")."""

    num_classes: int = Field(ge=1, description="identities in the training set")
    margins: tuple[float, float, float] = Field(
        (1.0, 0.5, 0.0),
        description="combined margin (m1, m2, m3): cos(m1*theta + m2) - m3; ArcFace (1, 0.5, 0), CosFace (1, 0, 0.4)",
    )
    scale: float = Field(64.0, gt=0, description="logit scale s")
    sample_rate: float = Field(
        1.0, gt=0, le=1, description="fraction of class centres per rank and step (all positives kept)"
    )

    @model_validator(mode="after")
    def _sane_margins(self) -> HeadConfig:
        m1, m2, m3 = self.margins
        if m1 < 1:
            raise ValueError(f"margins m1 must be >= 1 (multiplicative angular margin), got {m1}")
        if not 0 <= m2 < math.pi / 2:
            raise ValueError(f"margins m2 must be in [0, pi/2) (additive angular margin), got {m2}")
        if not 0 <= m3 < 1:
            raise ValueError(f"margins m3 must be in [0, 1) (additive cosine margin), got {m3}")
        return self


class DataConfig(_Section):
    """Where training images come from."""

    source: Literal["synthetic", "folder", "recordio", "shards"] = Field(
        "synthetic",
        description="synthetic: built-in synthetic masked faces; folder: one sub-folder per identity; "
        "recordio: insightface train.rec + train.idx; shards: WebDataset tar shards from mfrctl data pack",
    )
    uri: str | None = Field(
        None, description="local path or s3:// URL of the folder, the .rec (or its folder), or the shards' folder"
    )
    storage_options: StorageOptions = Field(
        {}, description="fsspec/s3fs options for uri; credentials come from the AWS_* environment"
    )
    images_per_identity: int = Field(32, ge=1, description="synthetic images per training identity")
    mask_prob: float = Field(0.35, ge=0, le=1, description="probability of drawing a face mask on a sample")
    flip: bool = Field(True, description="mirror half of the real-data samples")
    max_bad_fraction: float = Field(
        0.01, ge=0, le=1, description="abort when a rank skips more than this fraction of an epoch as unreadable"
    )
    shard_chunk: int = Field(
        1024,
        ge=1,
        description="shards: consecutive samples a DataLoader worker reads in one go (a span); each "
        "epoch permutes the spans and the samples inside each",
    )
    batch_size: int = Field(128, ge=1, description="samples per rank and optimizer step")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes per rank")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _uri_for_real_data(self) -> DataConfig:
        if self.source != "synthetic" and not self.uri:
            raise ValueError(f"data.source {self.source} needs data.uri (a local path or s3:// URL)")
        return self


class OptimConfig(_Section):
    """Optimizer, schedule and gradient handling (backbone and head alike)."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    weight_decay: float = Field(5e-4, ge=0)
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from 0 to lr")
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    poly_power: float = Field(2.0, gt=0)
    grad_clip: float | None = Field(5.0, gt=0, description="max global grad norm; null disables clipping")
    micro_batches: int = Field(1, ge=1, description="gradient accumulation: micro-batches per step")
    zero: Literal[0, 2, 3] = Field(
        0,
        description="ZeRO-style sharding of the backbone over data-parallel ranks (FSDP2): 0 = none (DDP); "
        "2 = optimizer state and gradients; 3 = also the parameters between uses",
    )

    @model_validator(mode="after")
    def _betas_in_range(self) -> OptimConfig:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {list(self.betas)}")
        return self


class RunConfig(_Section):
    """How long and on what the job runs."""

    steps: int = Field(1000, ge=1, description="optimizer steps")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available")
    amp: Literal["none", "bf16", "fp16"] = Field("none", description="autocast dtype; fp16 needs cuda")
    max_nonfinite_steps: int = Field(10, ge=1, description="abort after this many non-finite steps in a row")
    log_every: int = Field(10, ge=1)
    seed: int = Field(0, ge=0)
    output_dir: str = Field("runs/mfr", description="run directory: eval results, and checkpoints by default")


class CheckpointConfig(_Section):
    """Sharded checkpoints (torch.distributed.checkpoint) on any fsspec URL."""

    uri: str | None = Field(
        None, description="local path, file:// or s3://bucket/prefix; null = <run.output_dir>/checkpoints"
    )
    every_steps: int | None = Field(100, ge=1, description="save every N optimizer steps; null = not by steps")
    every_minutes: float | None = Field(None, gt=0, description="also save when this long passed since the last save")
    keep: int = Field(3, ge=1, description="committed checkpoints kept; the newest is never deleted")
    async_save: bool = Field(
        True, description="upload in the background; the loop waits only while the state is copied to host memory"
    )
    resume: str = Field(
        "auto", description="auto = the newest committed checkpoint under uri, if any; never; or one step-<N> URI"
    )
    preempt_budget_s: float = Field(
        25.0,
        gt=0,
        description="on SIGTERM, time allowed for the final save (torchrun kills workers 30 s after SIGTERM)",
    )
    retries: int = Field(4, ge=0, description="retries, with exponential backoff, of transient storage errors")
    storage_options: StorageOptions = Field(
        {},
        description="fsspec/s3fs options, e.g. {endpoint_url: http://minio:9000}; credentials come from the "
        "AWS_* environment (a Kubernetes Secret), never from the config",
    )

    @model_validator(mode="after")
    def _resume_is_known(self) -> CheckpointConfig:
        _, slash, name = self.resume.removesuffix("/").rpartition("/")
        if self.resume not in ("auto", "never") and not (slash and STEP_DIR.match(name)):
            raise ValueError(f"resume must be auto, never or a .../step-<N> checkpoint URI, got {self.resume!r}")
        return self

    def resolved_uri(self, output_dir: str) -> str:
        return self.uri if self.uri is not None else f"{output_dir.rstrip('/')}/checkpoints"


class EvalConfig(_Section):
    """Verification on held-out identities (never seen in training)."""

    num_identities: int = Field(100, ge=2)
    images_per_identity: int = Field(8, ge=2)
    fprs: list[float] = Field([1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6], min_length=1)
    batch_size: int = Field(256, ge=1)
    at_start: bool = Field(True, description="also evaluate the untrained model, as a baseline")
    every_steps: int | None = Field(
        None,
        ge=1,
        description="also evaluate every N optimizer steps (mfr_eval_tpr, eval events); null = only at "
        "the start and the end",
    )

    @model_validator(mode="after")
    def _fprs_are_rates(self) -> EvalConfig:
        bad = [f for f in self.fprs if not 0 < f < 1]
        if bad:
            raise ValueError(f"fprs must be in (0, 1), got {bad}")
        return self


class MetricsConfig(_Section):
    """The Prometheus exporter of every training process (names: ../shared/design.md)."""

    enabled: bool = Field(True, description="serve /metrics from every training process")
    port: int = Field(
        9410, ge=1, le=65535, description="the process of local rank i serves http://<address>:<port + i>/metrics"
    )
    address: str = Field("0.0.0.0", min_length=1, description="listen address; 127.0.0.1 keeps it on this machine")


class TeacherConfig(ArchitectureConfig):
    """The distillation teacher: its iResNet (a projection maps the student's embedding to its size), its checkpoint."""

    checkpoint: str | None = Field(
        None, description="a committed .../step-<N> checkpoint, or a checkpoint root (its newest); online mode"
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast dtype of the frozen teacher's forward (online mode); fp16 needs cuda"
    )


class DistillConfig(_Section):
    """Feature distillation: alpha*CE_margin + (1-alpha)*weight*mean||s^ - t^||^2 on L2-normalised embeddings."""

    mode: Literal["none", "online", "offline"] = Field(
        "none",
        description="online: run the frozen teacher on each batch; offline: read embeddings precomputed by "
        "mfrctl distill extract",
    )
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the margin loss; 1 - alpha weighs distillation")
    weight: float = Field(1.0, gt=0, description="lambda: scale of the distillation term")
    teacher: TeacherConfig = TeacherConfig()
    features: str | None = Field(
        None, description="offline mode: local path or s3:// URL written by mfrctl distill extract"
    )
    storage_options: StorageOptions = Field(
        {}, description="fsspec/s3fs options for the teacher checkpoint and features; credentials from AWS_* env"
    )

    @model_validator(mode="after")
    def _mode_has_its_source(self) -> DistillConfig:
        if self.mode == "online" and not self.teacher.checkpoint:
            raise ValueError("distill.mode online needs distill.teacher.checkpoint (a checkpoint URL)")
        if self.mode == "offline" and not self.features:
            raise ValueError("distill.mode offline needs distill.features (written by mfrctl distill extract)")
        return self


class TrainConfig(_Section):
    model: ModelConfig = ModelConfig()
    head: HeadConfig
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    metrics: MetricsConfig = MetricsConfig()
    distill: DistillConfig = DistillConfig()

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.data.batch_size % self.optim.micro_batches:
            raise ValueError(
                f"data.batch_size ({self.data.batch_size}) must be divisible by "
                f"optim.micro_batches ({self.optim.micro_batches})"
            )
        if self.optim.warmup_steps >= self.run.steps:
            raise ValueError(f"optim.warmup_steps ({self.optim.warmup_steps}) must be < run.steps ({self.run.steps})")
        if self.run.amp == "fp16" and self.run.device == "cpu":
            raise ValueError("run.amp fp16 needs a GPU (GradScaler); use bf16 on cpu")
        return self

    @model_validator(mode="after")
    def _no_url_credentials(self) -> TrainConfig:
        found = credential_paths(self.model_dump(mode="json"), keys=False)
        if found:
            raise ValueError(
                f"{', '.join(found)} holds a URL with user info (a password): the config is rendered into the "
                "ConfigMap and every checkpoint record; take credentials from the AWS_* environment (a Secret)"
            )
        return self


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. head.sample_rate=0.1")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is set to a value and cannot hold {leaf}")
            node = child
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({err.problem})") from None
    return tree


def merge(base: dict[str, Any], update: dict[str, Any], path: str = "") -> dict[str, Any]:
    """``update`` laid over ``base``, as Helm merges values: maps key by key, anything else replaced.

    A map never replaces a set value: that is a mistake (``head.num_classes.x=1``), a ConfigError naming it.
    """
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value, f"{path}{key}.")
        elif isinstance(value, dict) and key in merged and merged[key] is not None:
            raise ConfigError(f"{path}{key}.{next(iter(value), '…')}: {path}{key} is a value, not a section")
        else:
            merged[key] = value
    return merged


def _one_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        shown = "" if e["type"] in ("missing", "value_error") else f" (got {e['input']!r})"
        parts.append(f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}")
    return "; ".join(parts)


def read_yaml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """Read a YAML mapping (a config, or a values file: ``what``); any problem is a ConfigError."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {err}".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must be a mapping, got {type(data).__name__}")
    return data


def demo_config_path() -> Path:
    """The packaged config of the built-in synthetic demo (the default job)."""
    return Path(str(resources.files("mfr.trainer") / "configs" / DEMO_CONFIG))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Load and validate; ``path=None`` means the built-in synthetic demo."""
    return validate_config(apply_overrides(read_yaml(path if path is not None else demo_config_path()), overrides))


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """``data`` with ``--set a.b=c`` overrides laid over it (not validated yet)."""
    try:
        return merge(data, parse_overrides(overrides or []))
    except ConfigError as err:
        raise ConfigError(f"--set {err}") from None


def check_world_size(world_size: int, *, num_classes: int | None = None, zero: int = 0) -> None:
    """The config's rules that need the number of ranks, which a config alone does not know: a ConfigError naming
    the first one broken.  The trainer checks them when it starts, ``mfrctl plan`` for the GPUs it plans."""
    if num_classes is not None and num_classes < world_size:
        raise ConfigError(f"head.num_classes ({num_classes}) must be >= the world size ({world_size})")
    if zero and world_size < 2:
        raise ConfigError(
            f"optim.zero {zero} shards the backbone over data-parallel ranks, but the world size is {world_size}: "
            "it needs more than one GPU or process; run on 2 or more ranks or set optim.zero=0"
        )


def validate_config(data: dict[str, Any]) -> TrainConfig:
    """Validate a config mapping (e.g. a chart's ``train:`` values); a mistake is a ConfigError."""
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None

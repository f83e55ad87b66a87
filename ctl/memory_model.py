"""The memory model of a training step: the per-GPU peak of a configuration, and what lowers it.

Pure arithmetic over the architecture (torch-free): the iResNet of
``trainer/models.py`` and the Partial FC head of ``trainer/head.py``.  The
per-GPU peak is the larger of two moments of a step:

* backward: everything held between steps, plus the activations the backbone
  saved for backward, the head's logits and softmax buffers, and the gradients
  being built;
* the optimizer step: everything held between steps, plus all gradients and
  the optimizer's temporaries.

The constants marked "measured" were fitted to the peak of real trainer steps
(``trainer/memory.py`` on CPU, see ``benchmarks/bench_memory.py``); the rest is
counting bytes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from mfr.trainer.config import DEFAULT_WIDTHS, INPUT_SIZE, STAGE_WIDTHS, TrainConfig, backbone_layers, check_world_size
from mfr.trainer.partition import class_shard, sampled_classes

FP32 = 4
AMP_BYTES = {"none": 4, "bf16": 2, "fp16": 2}
# Measured: a layer's backward holds the gradient of its output and of its
# input (and the convolution's scratch) on top of what was saved.
BACKWARD_TRANSIENT_TENSORS = 2.0
# Measured on CPU: under autocast the backward holds about one more fp32
# tensor of that size (mixed-precision BatchNorm works in fp32).
AUTOCAST_TRANSIENT_TENSORS = 1.0
# Measured: the head holds about this many (global batch x sampled classes)
# fp32 buffers at its peak: the one that holds cosines, logits, probabilities
# and their gradient in turn, and the transients of the softmax beside it.
HEAD_LOGIT_BUFFERS = 2.0

_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?)\s*$", re.IGNORECASE)


class PlanError(ValueError):
    """Impossible planner input: reported as one line, exit 2."""


def parse_memory(text: str) -> int:
    """Bytes in ``80GiB``, ``80Gi`` (binary) or ``32GB``, ``32G`` (decimal)."""
    match = _MEMORY.match(text)
    if not match:
        raise PlanError(f"--gpu-memory {text!r}: expected a size with a unit, e.g. 80GiB or 32GB")
    number, unit = float(match[1]), match[2].upper().removesuffix("B")
    base = 1024 if unit.endswith("I") else 1000
    power = "KMGT".index(unit[0]) + 1
    size = int(number * base**power)
    if size <= 0:
        raise PlanError(f"--gpu-memory {text!r} must be more than 0")
    return size


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Block:
    """One ``IBasicBlock``: channels in and out, stride, input map side."""

    stage: int
    in_channels: int
    out_channels: int
    stride: int
    size: int

    @property
    def out_size(self) -> int:
        return self.size // self.stride

    def parameters(self) -> int:
        i, o = self.in_channels, self.out_channels
        count = 2 * i + 9 * i * o + 2 * o + o + 9 * o * o + 2 * o  # BN, conv, BN, PReLU, conv, BN
        if self.stride != 1 or i != o:
            count += i * o + 2 * o  # conv1x1 + BN shortcut
        return count

    def batch_norms(self) -> list[int]:
        shortcut = [self.out_channels] if self.stride != 1 or self.in_channels != self.out_channels else []
        return [self.in_channels, self.out_channels, self.out_channels, *shortcut]

    def saved(self) -> int:
        """Elements per sample kept for backward: each op's input, once."""
        full, out = self.size**2, self.out_size**2
        kept = 2 * self.in_channels * full  # BN input, conv input (the BN's output)
        kept += 3 * self.out_channels * full  # BN input, PReLU input, strided conv input
        kept += self.out_channels * out  # last BN input
        if self.stride != 1 or self.in_channels != self.out_channels:
            kept += self.out_channels * out  # shortcut BN input
        return kept

    def largest(self) -> int:
        return max(self.in_channels, self.out_channels) * self.size**2


@dataclass(frozen=True)
class Architecture:
    """The iResNet of ``trainer/models.py``, as numbers."""

    layers: tuple[int, int, int, int]
    width: float = 1.0
    embedding: int = 512

    @classmethod
    def named(cls, backbone: str, layers=None, width=None, embedding: int = 512) -> Architecture:
        """The architecture of a validated ``model:`` (or ``distill.teacher:``) section's fields."""
        return cls(
            backbone_layers(backbone, layers), DEFAULT_WIDTHS.get(backbone, 1.0) if width is None else width, embedding
        )

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(max(1, round(base * self.width)) for base in STAGE_WIDTHS)

    @property
    def final_map(self) -> int:
        return INPUT_SIZE // 2 ** len(STAGE_WIDTHS)

    def blocks(self) -> Iterator[Block]:
        size, in_channels = INPUT_SIZE, self.channels[0]
        for stage, (depth, out_channels) in enumerate(zip(self.layers, self.channels)):
            for index in range(depth):
                stride = 2 if index == 0 else 1
                yield Block(stage, in_channels, out_channels, stride, size)
                size, in_channels = size // stride, out_channels

    def parameters(self) -> int:
        c0, c3, e = self.channels[0], self.channels[-1], self.embedding
        stem = 27 * c0 + 2 * c0 + c0
        head = 2 * c3 + c3 * self.final_map**2 * e + e + 2 * e
        return stem + sum(b.parameters() for b in self.blocks()) + head

    def buffer_bytes(self) -> int:
        """BatchNorm running mean and variance (fp32) and step counter (int64)."""
        inner = (c for b in self.blocks() for c in b.batch_norms())
        norms = [self.channels[0], *inner, self.channels[-1], self.embedding]
        return sum(2 * FP32 * c + 8 for c in norms)

    def stem_saved(self) -> int:
        return 2 * self.channels[0] * INPUT_SIZE**2  # BN input, PReLU input

    def top_saved(self) -> int:
        """BN2d input, linear input, BatchNorm1d input, the embedding."""
        return 2 * self.channels[-1] * self.final_map**2 + 2 * self.embedding

    def segments(self, checkpointing: str = "none", every: int = 1) -> list[list[Block]]:
        """The blocks grouped as ``IResNet.segments`` runs (and recomputes) them."""
        blocks = list(self.blocks())
        if checkpointing == "none":
            return [[b] for b in blocks]
        if checkpointing == "stage":
            return [[b for b in blocks if b.stage == s] for s in range(len(self.layers))]
        return [blocks[i : i + every] for i in range(0, len(blocks), every)]


def backbone_activations(arch: Architecture, checkpointing: str, every: int, element: int) -> tuple[int, int]:
    """Bytes per sample: ``(saved at the end of forward, most alive during the backbone's backward)``.

    Saved tensors take ``element`` bytes (2 under autocast).  A checkpointed
    segment keeps only its input through forward; backward re-creates its
    saved tensors, one segment at a time.  While a block runs backward, the
    segments before it still hold theirs, the ones after have released
    them, and the block adds the gradients of its output and input, counted
    as fp32 (measured on CPU, where autocast's backward works in fp32).
    """
    checkpointed = checkpointing != "none"
    transient = FP32 * (BACKWARD_TRANSIENT_TENSORS + (AUTOCAST_TRANSIENT_TENSORS if element < FP32 else 0))
    segments = arch.segments(checkpointing, every)
    kept = [seg[0].in_channels * seg[0].size ** 2 if checkpointed else seg[0].saved() for seg in segments]
    stem = arch.stem_saved() + (3 * INPUT_SIZE**2 if element < FP32 else 0)  # + the image cast by autocast
    end_of_forward = stem + sum(kept) + arch.top_saved()
    most = element * stem + transient * arch.channels[0] * INPUT_SIZE**2
    for index, segment in enumerate(segments):
        earlier = stem + sum(kept[:index]) + (kept[index] if checkpointed else 0)
        for position, block in enumerate(segment):
            alive = earlier + sum(b.saved() for b in segment[: position + 1])
            most = max(most, element * alive + transient * block.largest())
    return element * end_of_forward, int(most)


@dataclass(frozen=True)
class PlanSpec:
    """Everything the per-GPU peak depends on: a validated TrainConfig's settings (``from_config``) on a cluster."""

    nodes: int = 1
    gpus_per_node: int = 1
    gpu_memory: int = 80 * 2**30
    classes: int = 2_059_906
    embedding: int = 512
    backbone: str = "r50"
    layers: tuple[int, int, int, int] | None = None
    width: float | None = None
    batch: int = 128
    sample_rate: float = 1.0
    precision: str = "none"
    zero: int = 0
    activation_checkpointing: str = "none"
    checkpoint_every: int = 1
    micro_batches: int = 1
    optimizer: str = "sgd"
    momentum: float = 0.9
    reserve: int = int(1.5 * 2**30)

    @classmethod
    def from_config(cls, cfg: TrainConfig, **cluster: Any) -> PlanSpec:
        """The spec of a validated TrainConfig, on ``cluster`` (nodes, gpus_per_node, gpu_memory, reserve)."""
        return cls(
            classes=cfg.head.num_classes,
            embedding=cfg.model.embedding_size,
            backbone=cfg.model.backbone,
            layers=tuple(cfg.model.layers) if cfg.model.layers else None,
            width=cfg.model.width,
            batch=cfg.data.batch_size,
            sample_rate=cfg.head.sample_rate,
            precision=cfg.run.amp,
            zero=cfg.optim.zero,
            activation_checkpointing=cfg.model.activation_checkpointing,
            checkpoint_every=cfg.model.checkpoint_every,
            micro_batches=cfg.optim.micro_batches,
            optimizer=cfg.optim.name,
            momentum=cfg.optim.momentum,
            **cluster,
        )

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def check(self) -> None:
        """Raise PlanError (or ConfigError) naming the first impossible input of the cluster.

        The training settings were validated by TrainConfig (``from_config``); what depends on the
        number of GPUs is checked by the trainer's own rule (``check_world_size``).
        """
        for name in ("nodes", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise PlanError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.reserve < 0 or self.gpu_memory <= 0:
            raise PlanError("--gpu-memory must be > 0 and --reserve >= 0")
        check_world_size(self.world_size, num_classes=self.classes, zero=self.zero)

    def architecture(self) -> Architecture:
        return Architecture.named(self.backbone, self.layers, self.width, self.embedding)


@dataclass(frozen=True)
class Item:
    part: str  # backbone | head | data
    name: str
    bytes: int
    detail: str = ""


@dataclass
class Plan:
    spec: PlanSpec
    parameters: int
    classes_per_gpu: int
    sampled_classes: int
    items: list[Item]
    peak_moment: str
    peak: int
    moments: dict[str, int]
    suggestions: list[dict] = field(default_factory=list)

    @property
    def available(self) -> int:
        return self.spec.gpu_memory - self.spec.reserve

    @property
    def headroom(self) -> int:
        return self.available - self.peak

    @property
    def fits(self) -> bool:
        return self.headroom >= 0

    def to_dict(self) -> dict:
        spec = asdict(self.spec)
        spec["layers"] = list(self.spec.architecture().layers)
        return {
            "inputs": spec,
            "world_size": self.spec.world_size,
            "backbone_parameters": self.parameters,
            "head_classes_per_gpu": self.classes_per_gpu,
            "head_sampled_classes_per_step": self.sampled_classes,
            "breakdown": [asdict(i) for i in self.items],
            "peak_moment": self.peak_moment,
            "peak_bytes": self.peak,
            "moments_bytes": self.moments,
            "gpu_memory_bytes": self.spec.gpu_memory,
            "reserve_bytes": self.spec.reserve,
            "headroom_bytes": self.headroom,
            "fits": self.fits,
            "suggestions": self.suggestions,
        }


def plan_memory(spec: PlanSpec) -> Plan:
    """The per-GPU peak of ``spec``, itemised (rank 0: it holds the largest head shard)."""
    spec.check()
    arch = spec.architecture()
    world, params = spec.world_size, arch.parameters()
    full = FP32 * params
    shard = math.ceil(full / world) if spec.zero else full
    sharded = f", 1/{world} each (zero {spec.zero})" if spec.zero else ""
    micro = spec.batch // spec.micro_batches
    act = AMP_BYTES[spec.precision]
    copies = {"sgd": 1 if spec.momentum > 0 else 0, "adamw": 2}[spec.optimizer]
    _, num_local = class_shard(spec.classes, world, 0)
    sampled = sampled_classes(num_local, spec.sample_rate)  # the batch's positives assumed among them
    rows, e = world * micro, spec.embedding
    centres = FP32 * num_local * e
    sampling = sampled < num_local
    sampled_rows = FP32 * sampled * e  # the head's temporaries are blocks of the sampled rows (trainer/head.py)
    optimizer_state = "momentum" if spec.optimizer == "sgd" else "exp_avg, exp_avg_sq"

    held = [
        Item("backbone", "parameters", shard, f"{params / 1e6:.2f} M fp32{sharded}"),
        Item("backbone", "buffers", arch.buffer_bytes(), "BatchNorm running statistics"),
        Item("backbone", "optimizer state", copies * shard, f"{spec.optimizer} {optimizer_state}{sharded}"),
        Item("head", "shard weights", centres, f"{num_local:,} classes x {e} fp32"),
        Item("head", "optimizer state", copies * centres, f"{spec.optimizer} {optimizer_state}"),
        Item(
            "head",
            "gradient",
            sampled_rows,
            "kept from step to step" + (f", the {sampled:,} sampled rows only" if sampling else ""),
        ),
        Item("data", "input batch", FP32 * spec.batch * 3 * INPUT_SIZE**2, f"{spec.batch} x 3x112x112 fp32"),
    ]
    if sampling and spec.optimizer == "sgd":
        held.append(Item("head", "gathered rows", 2 * sampled_rows, "the sampled rows and their momentum, kept"))
    if spec.zero == 0:
        held.append(Item("backbone", "DDP gradient buckets", full, "all-reduce buffers, as large as the gradients"))

    in_step = []  # alive from forward until the backward of each unit
    if spec.zero == 2:
        in_step.append(Item("backbone", "gathered parameters", full, "all-gathered in forward, kept until backward"))
    elif spec.zero == 3:
        gathered = FP32 * (arch.parameters() - sum(b.parameters() for b in arch.blocks()) + 2 * _largest_block(arch))
        in_step.append(Item("backbone", "gathered parameters", gathered, "root unit and two blocks at a time"))
    if spec.precision != "none":
        in_step.append(
            Item("backbone", "low-precision weights", act * params, f"{spec.precision} copies made by autocast")
        )
    if spec.micro_batches > 1:
        in_step.append(
            Item("backbone", "accumulated gradients", full, "earlier micro-batches, unsharded until the last")
        )
        if sampling:  # a dense gradient accumulates in place; sparse ones are concatenated
            accumulated = (spec.micro_batches - 1) * sampled_rows
            in_step.append(Item("head", "accumulated gradient", accumulated, "earlier micro-batches' sampled rows"))
    if sampling and spec.optimizer != "sgd":
        in_step.append(Item("head", "gathered rows", sampled_rows, f"{sampled:,} sampled rows, saved for backward"))
    backbone_grads = Item(
        "backbone",
        "gradients",
        full if spec.zero == 0 else shard,
        "fp32" if spec.zero == 0 else f"reduce-scattered to 1/{world} per unit",
    )

    kept, backbone_peak = backbone_activations(arch, spec.activation_checkpointing, spec.checkpoint_every, act)
    checkpointing = (
        ""
        if spec.activation_checkpointing == "none"
        else f", {spec.activation_checkpointing} checkpointing"
        + (f" every {spec.checkpoint_every}" if spec.activation_checkpointing == "block" else "")
    )
    logits = int(HEAD_LOGIT_BUFFERS * FP32 * rows * sampled)
    head_backward = [
        Item("backbone", "activations", micro * kept, f"saved for backward, {micro} samples{checkpointing}"),
        Item("head", "logits and softmax", logits, f"{rows} rows x {sampled:,} classes, one buffer in turn"),
        Item("head", "all-gathered embeddings", 3 * FP32 * rows * e, f"{rows} x {e}: gathered, normalised, gradient"),
    ]
    backbone_backward = [
        Item(
            "backbone",
            "activations",
            micro * backbone_peak,
            f"still saved, recomputed and gradients of one block, {micro} samples{checkpointing}",
        ),
        *(
            [Item("backbone", "a unit's full gradients", FP32 * _largest_unit(arch), "before their reduce-scatter")]
            if spec.zero
            else []
        ),
        *(
            [backbone_grads]
            if spec.micro_batches == 1
            else [
                # measured: the last micro-batch's gradients exist beside the accumulated ones before the sum
                Item("backbone", "new gradients", full, "this micro-batch's, before they are accumulated"),
                Item(
                    "head",
                    "new gradient",
                    (1 + spec.micro_batches) * sampled_rows if sampling else centres,
                    "this micro-batch's" + (", and the concatenation it joins" if sampling else ", before the sum"),
                ),
            ]
        ),
    ]
    step = [
        backbone_grads,
        Item("backbone", "optimizer temporaries", copies * shard, "e.g. the weight-decayed gradients"),
    ]
    if spec.optimizer != "sgd":  # AdamW steps every row (trainer/row_optim.py): a dense gradient and temporaries
        step.append(Item("head", "optimizer temporaries", (copies + sampling) * centres, "dense over the shard"))
    elif sampling and spec.micro_batches > 1:
        step.append(Item("head", "coalesced gradient", sampled_rows, "the micro-batches' rows summed"))
    moments = {
        "head backward": [*held, *in_step, *head_backward],
        "backbone backward": [*held, *in_step, *backbone_backward],
        "optimizer step": [*held, *step],
    }
    totals = {name: sum(i.bytes for i in items) for name, items in moments.items()}
    peak_moment = max(totals, key=totals.get)
    return Plan(spec, params, num_local, sampled, moments[peak_moment], peak_moment, totals[peak_moment], totals)


def _largest_block(arch: Architecture) -> int:
    return max(b.parameters() for b in arch.blocks())


def _largest_unit(arch: Architecture) -> int:
    """Parameters of the largest FSDP unit: a block, or the root (stem and output layer)."""
    return max(_largest_block(arch), arch.parameters() - sum(b.parameters() for b in arch.blocks()))


def _next_micro_batches(spec: PlanSpec) -> int | None:
    return next((m for m in range(spec.micro_batches + 1, spec.batch + 1) if spec.batch % m == 0), None)


def _switches(spec: PlanSpec) -> Iterator[tuple[dict, PlanSpec]]:
    """Single changes that lower the peak, cheapest in step time first: ``({config key: value}, spec)``."""
    if spec.zero == 0 and spec.world_size > 1:
        yield {"optim.zero": 2}, replace(spec, zero=2)
    if spec.precision == "none":
        yield {"run.amp": "bf16"}, replace(spec, precision="bf16")
    if spec.activation_checkpointing == "none":
        yield {"model.activation_checkpointing": "stage"}, replace(spec, activation_checkpointing="stage")
    if spec.sample_rate > 0.1:
        yield {"head.sample_rate": 0.1}, replace(spec, sample_rate=0.1)
    if (micro := _next_micro_batches(spec)) is not None:
        yield {"optim.micro_batches": micro}, replace(spec, micro_batches=micro)
    if spec.zero in (0, 2) and spec.world_size > 1:
        yield {"optim.zero": 3}, replace(spec, zero=3)
    if spec.activation_checkpointing != "block":
        yield {"model.activation_checkpointing": "block"}, replace(spec, activation_checkpointing="block")


def _fewest_nodes(spec: PlanSpec, most: int = 4096) -> int | None:
    """The fewest nodes (same GPUs per node) on which ``spec`` fits, if any up to ``most``."""
    low, high = spec.nodes, None
    probe = spec.nodes * 2
    while probe <= most:
        if plan_memory(replace(spec, nodes=probe)).fits:
            high = probe
            break
        low, probe = probe, probe * 2
    if high is None:
        return None
    while high - low > 1:  # the peak only falls as nodes are added
        middle = (low + high) // 2
        low, high = (low, middle) if plan_memory(replace(spec, nodes=middle)).fits else (middle, high)
    return high


def suggest(spec: PlanSpec) -> list[dict]:
    """What to switch on when ``spec`` does not fit, each checked by planning it.

    First every single switch on its own; when none fits alone, the switches
    that lower the peak added one after another (micro-batches raised again
    and again) until the configuration fits; then the fewest nodes that fit.
    """
    suggestions = []
    for change, candidate in _switches(spec):
        result = plan_memory(candidate)
        suggestions.append({"set": change, "peak_bytes": result.peak, "fits": result.fits})
    if not any(hint["fits"] for hint in suggestions):
        combined, changes = spec, {}
        while not (current := plan_memory(combined)).fits:
            step = next((c for c in _switches(combined) if plan_memory(c[1]).peak < current.peak), None)
            if step is None:
                break
            changes.update(step[0])
            combined = step[1]
        if not current.fits and (nodes := _fewest_nodes(combined)) is not None:
            changes["nodes"] = nodes
            combined = replace(combined, nodes=nodes)
        if changes and plan_memory(combined).fits:
            suggestions.append({"set": changes, "peak_bytes": plan_memory(combined).peak, "fits": True})
    nodes = _fewest_nodes(spec)
    if nodes is not None:
        peak = plan_memory(replace(spec, nodes=nodes)).peak
        suggestions.append({"set": {"nodes": nodes}, "peak_bytes": peak, "fits": True})
    return suggestions

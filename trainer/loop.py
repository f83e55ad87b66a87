"""The training loop: composes backbone (DDP or ZeRO), sharded head, data and optimizer."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from . import metrics
from .checkpoint import Checkpointer, as_numbers, as_tensors
from .checkpoint_reader import BACKBONE, DISTILL, HEAD, OPTIM, PROGRESS, RNG, SCALER
from .config import ConfigError, TrainConfig
from .data.loader import EpochStream
from .dist import DistEnv
from .distill import Distillation
from .evaluate import HeldOutEvaluator
from .head import PartialFC
from .models import build_backbone
from .optim import build_optimizer, clip_global_grad_norm, set_lr, state_slots
from .parallel import broadcast_buffers, gradient_sync, parallelize, reshard, unwrap
from .progress import Progress, configure, log
from .verification import ProtocolResult, format_fpr


class TrainingAborted(RuntimeError):
    """The run cannot go on (e.g. the loss stays non-finite); exit non-zero."""


class Trainer:
    def __init__(self, cfg: TrainConfig, env: DistEnv):
        if cfg.run.amp == "fp16" and env.device.type != "cuda":
            raise ConfigError("run.amp fp16 needs a CUDA device (GradScaler); use bf16 on cpu")
        self.cfg, self.env = cfg, env
        configure(env.rank)
        torch.manual_seed(cfg.run.seed)  # same backbone init on every rank
        backbone = build_backbone(
            cfg.model.backbone,
            layers=cfg.model.layers,
            width=cfg.model.width,
            embedding_size=cfg.model.embedding_size,
            dropout=cfg.model.dropout,
            activation_checkpointing=cfg.model.activation_checkpointing,
            checkpoint_every=cfg.model.checkpoint_every,
        ).to(env.device)
        self.model = parallelize(backbone, cfg.optim.zero, env)  # what the step calls: DDP or the sharded backbone
        self.head = PartialFC(
            cfg.model.embedding_size,
            cfg.head.num_classes,
            margins=cfg.head.margins,
            scale=cfg.head.scale,
            sample_rate=cfg.head.sample_rate,
            seed=cfg.run.seed,
        ).to(env.device)
        self.optimizer = build_optimizer(cfg.optim, self.model, self.head)
        # DDP makes backbone gradients equal on every rank; under ZeRO each rank holds a shard of them
        backbone_params = list(self.backbone.parameters())
        self.replicated_params = [] if cfg.optim.zero else backbone_params
        self.sharded_params = (backbone_params if cfg.optim.zero else []) + list(self.head.parameters())
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.run.amp == "fp16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.run.amp)
        try:
            self.data = EpochStream(
                cfg.data,
                cfg.head.num_classes,
                env.rank,
                env.world_size,
                pin_memory=env.device.type == "cuda",
                with_indices=cfg.distill.mode == "offline",
            )
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.distillation = None if cfg.distill.mode == "none" else Distillation(cfg, env, len(self.data.dataset))
        if self.distillation is not None and self.distillation.projection is not None:
            self.optimizer.add_param_group({"params": self.distillation.parameters(), "name": "distill"})
            self.replicated_params += self.distillation.parameters()
        self.evaluator = HeldOutEvaluator(cfg.eval, cfg.data, cfg.head.num_classes, env)
        self.progress = Progress(enabled=env.is_main)
        self.checkpointer = Checkpointer(cfg, env, self, self.progress, world_bound=(RNG,))
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.lr = 0.0  # of the last step, for the logs
        self.last_grad_norm = float("nan")
        self.metrics_url = metrics.serve(cfg.metrics, env.local_rank) if cfg.metrics.enabled else None
        self.metrics = metrics.TrainMetrics(env.rank, env.world_size, env.restart_count, env.device)

    @property
    def backbone(self) -> torch.nn.Module:
        """The iResNet itself (its parameters are DTensor shards under ZeRO)."""
        return unwrap(self.model)

    @property
    def global_batch(self) -> int:
        return self.cfg.data.batch_size * self.env.world_size

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype)

    # -- checkpoint state (checkpoint.Stateful) ----------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, as views of the live tensors (a load writes into them in place); numbers
        as 0-dim tensors, so that a checkpoint holds nothing but tensors (see checkpoint_reader)."""
        model, head, opt = self.backbone, self.head, self.optimizer
        reshard(model)  # ZeRO: parameters as the DTensor shards the optimizer state is keyed by
        broadcast_buffers(model)  # rank 0's BatchNorm statistics: what DDP broadcasts before the next forward
        opt.catch_up()  # head rows that SGD stepped lazily: every row and its momentum up to date (row_optim)
        names = {p: n for n, p in model.named_parameters()}
        head_slots = {
            k: head.sharded(v) if v.shape == head.weight.shape else v for k, v in state_slots(opt, head.weight).items()
        }
        state: dict[str, Any] = {
            BACKBONE: model.state_dict(),
            HEAD: {"weight": head.sharded(head.weight.detach())},
            OPTIM: {
                BACKBONE: {names[p]: state_slots(opt, p) for p in model.parameters()},
                HEAD: {"weight": head_slots},
            },
            PROGRESS: as_tensors(
                {"step": self.step, "nonfinite_in_a_row": self.nonfinite_in_a_row, **self.data.state_dict()}
            ),
        }
        if self.scaler.is_enabled():
            state[SCALER] = as_tensors(self.scaler.state_dict())
        projection = self.distillation.projection if self.distillation is not None else None
        if projection is not None:  # distillation's student->teacher projection, trained like the backbone
            state[DISTILL] = {"projection": projection.state_dict()}
            state[OPTIM][DISTILL] = {n: state_slots(opt, p) for n, p in projection.named_parameters()}
        rng = {"torch": torch.get_rng_state(), "head_sampler": head.sampler_state()}
        if self.env.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.env.device)
        state[RNG] = {f"rank{self.env.rank}": rng}  # world-bound: restored on the same world size only
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Finish a load: the tensors are in place already; set the optimizer state, counters and RNG streams."""
        model, head, opt = self.backbone, self.head, self.optimizer
        for name, p in model.named_parameters():
            if state[OPTIM][BACKBONE][name]:
                opt.state[p] = dict(state[OPTIM][BACKBONE][name])
        head_slots = {
            k: v.local_shards()[0].tensor if hasattr(v, "local_shards") else v
            for k, v in state[OPTIM][HEAD]["weight"].items()
        }
        if head_slots:
            opt.state[head.weight] = head_slots
        for name, p in self.distillation.projection.named_parameters() if DISTILL in state else ():
            if state[OPTIM][DISTILL][name]:
                opt.state[p] = dict(state[OPTIM][DISTILL][name])
        progress = as_numbers(state[PROGRESS])
        self.step = int(progress["step"])
        self.nonfinite_in_a_row = int(progress["nonfinite_in_a_row"])
        self.data.load_state_dict(progress)
        if SCALER in state:
            self.scaler.load_state_dict(as_numbers(state[SCALER]))
        rng = state.get(RNG, {}).get(f"rank{self.env.rank}")
        seed = self.cfg.run.seed
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"], self.env.device)
        else:  # a new world: fresh, but reproducible, streams for this rank
            torch.manual_seed(seed * 1_000_003 + self.step)
        head.load_sampler_state(rng["head_sampler"] if rng is not None else None, seed, self.step)

    def train_step(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor | None = None
    ) -> float | None:
        """One optimizer step over ``micro_batches`` micro-batches; None if skipped.

        ``indices`` (the samples' indices in the data source) are needed by offline distillation only.
        """
        micro = self.cfg.optim.micro_batches
        self.lr = set_lr(self.optimizer, self.cfg.optim, self.step, self.cfg.run.steps)
        images = images.to(self.env.device, non_blocking=True)
        targets = None if self.distillation is None else self.distillation.targets(images, labels, indices)
        labels = labels.to(self.env.device, non_blocking=True)
        loss_sum = torch.zeros((), device=self.env.device)
        for i, (x, y) in enumerate(zip(images.chunk(micro), labels.chunk(micro))):
            sync_grads = i == micro - 1
            with gradient_sync(self.model, sync_grads):
                with self._autocast():
                    embeddings = self.model(x)
                loss = self.head(embeddings, y)
                if targets is not None:
                    loss = self.distillation.combine(loss, embeddings, targets.chunk(micro)[i])
                self.scaler.scale(loss / micro).backward()
            loss_sum += loss.detach()
        if self.distillation is not None:
            self.distillation.sync_grads()

        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_global_grad_norm(
            self.replicated_params, self.sharded_params, self.cfg.optim.grad_clip, self.env.device
        )
        loss_value = float(loss_sum) / micro
        finite = bool(torch.isfinite(loss_sum)) and (self.scaler.is_enabled() or bool(torch.isfinite(grad_norm)))
        if finite:
            self.scaler.step(self.optimizer)
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.nonfinite_in_a_row >= self.cfg.run.max_nonfinite_steps:
            raise TrainingAborted(
                f"loss or gradients were non-finite for {self.nonfinite_in_a_row} steps in a row "
                f"(up to step {self.step}); lower optim.lr, enable optim.grad_clip or check the data"
            )
        self.last_grad_norm = float(grad_norm)
        return loss_value if finite else None

    def evaluate(self, stage: str) -> dict[str, ProtocolResult]:
        """TPR@FPR of the backbone on held-out identities, reported by rank 0."""
        report = self.evaluator(self.backbone)
        reshard(self.backbone)  # evaluation's forward (no backward) leaves ZeRO-2 parameters gathered
        self.metrics.eval_results(report)
        self.progress.event("eval", stage=stage, step=self.step, results=[r.to_dict() for r in report.values()])
        for protocol, result in report.items():
            points = " ".join(
                f"{format_fpr(p.target_fpr)}={'n/a' if p.tpr is None else f'{p.tpr:.4f}'}" for p in result.points
            )
            log.info(f"eval {stage} {protocol} TPR@FPR {points}")
        return report

    def fit(self) -> None:
        cfg, env = self.cfg, self.env
        self.progress.event(
            "start",
            steps=cfg.run.steps,
            world_size=env.world_size,
            global_batch=self.global_batch,
            device=str(env.device),
            restart_count=env.restart_count,
            metrics_url=self.metrics_url,
        )
        log.info(
            f"world size {env.world_size} on {env.device}, global batch {self.global_batch}, "
            f"{cfg.head.num_classes} classes ({self.head.num_local} on rank 0), {cfg.run.steps} steps"
        )
        self.checkpointer.install_sigterm_handler()
        resumed = self.checkpointer.resume()
        self.metrics.step.set(self.step)  # a resumed run reports its step before the first new one
        if cfg.eval.at_start and resumed is None:
            self.evaluate("untrained")
        window_start, window_samples = time.perf_counter(), 0
        batches = iter(self.data)
        while self.step < cfg.run.steps:
            started = time.perf_counter()
            batch = next(batches)  # (images, labels), and sample indices for offline distillation
            fetched = time.perf_counter()
            loss = self.train_step(*batch)
            self.checkpointer.after_step(self.step)
            window_samples += self.global_batch
            self.metrics.after_step(
                self.step,
                cfg.data.batch_size,
                loss,
                self.lr,
                self.last_grad_norm,
                seconds=time.perf_counter() - started,
                data_wait=fetched - started,
            )
            if self.step % cfg.run.log_every == 0 or self.step == cfg.run.steps:
                elapsed = time.perf_counter() - window_start
                rate = window_samples / elapsed
                self.progress.event(
                    "step", step=self.step, loss=loss, lr=self.lr, samples_per_s=rate, epoch=self.data.epoch
                )
                shown = "non-finite (skipped)" if loss is None else f"{loss:.4f}"
                log.info(
                    f"step {self.step}/{cfg.run.steps} loss {shown} lr {self.lr:.4g} "
                    f"grad_norm {self.last_grad_norm:.3g} {rate:.1f} samples/s"
                )
                window_start, window_samples = time.perf_counter(), 0
                self.metrics.update_memory()
            if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and self.step < cfg.run.steps:
                eval_started = time.perf_counter()
                self.evaluate(f"step {self.step}")  # on every rank: the embeddings are all-gathered
                window_start += time.perf_counter() - eval_started  # samples/s stays a training rate
        self.checkpointer.finish(self.step)
        self.checkpointer.close()
        self.evaluate("trained")
        self.progress.event("done", step=self.step)
        self.progress.close()

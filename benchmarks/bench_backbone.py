"""CPU training throughput of the iResNet backbones, fp32 against bf16 autocast.

    python benchmarks/bench_backbone.py [--backbones tiny r18] [--batch 32] [--steps N] [--threads T]

A step is forward + backward + SGD (momentum, weight decay) on the backbone
alone, on a fixed random batch of 3x112x112 images; the loss is a fixed
random projection of the embeddings (a squared norm would be flat through
the final BatchNorm1d).  Each (backbone, precision) pair gets a fresh model
from the same seed, ``--warmup`` untimed steps, then ``--steps`` timed ones;
the table reports the median.  The bf16/fp32 ratio is against the fp32 run
of the same backbone in this invocation, so both numbers share the machine's
state.  bf16 only pays off on CPUs with native bf16 (AVX512-BF16, AMX); the
header shows the ISA torch dispatches to.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch

from mfr.trainer.config import BACKBONE_DEPTHS
from mfr.trainer.models import build_backbone, count_parameters

PRECISIONS = ("fp32", "bf16")


def _cpu_model() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no lscpu)"
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    details = [fields.get(key, "?").strip() for key in ("Model name", "CPU family", "Model")]
    return f"{details[0]} (family {details[1]}, model {details[2]})"


def _median_step_seconds(name: str, precision: str, batch: int, warmup: int, steps: int) -> float:
    torch.manual_seed(0)
    model = build_backbone(name).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(batch, 3, 112, 112)
    projection = torch.randn(batch, model.embedding_size)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            embeddings = model(images)
        (embeddings.float() * projection).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    durations = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--backbones", nargs="+", default=["tiny", "r18"], choices=list(BACKBONE_DEPTHS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per backbone and precision")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(f"CPU: {_cpu_model()}; torch {torch.__version__}, ISA {torch.backends.cpu.get_cpu_capability()}")
    print(
        f"torch.get_num_threads() = {torch.get_num_threads()}; batch {args.batch}, "
        f"{args.warmup} warm-up + {args.steps} timed steps (median)"
    )
    print()
    header = f"{'backbone':<9} {'params':>8} {'precision':<9} {'step ms':>9} {'samples/s':>10} {'vs fp32':>8}"
    print(header)
    print("-" * len(header))
    for name in args.backbones:
        with torch.device("meta"):
            params = count_parameters(build_backbone(name))
        samples_per_second = {}
        for precision in PRECISIONS:
            seconds = _median_step_seconds(name, precision, args.batch, args.warmup, args.steps)
            samples_per_second[precision] = args.batch / seconds
            ratio = samples_per_second[precision] / samples_per_second["fp32"]
            print(
                f"{name:<9} {params / 1e6:>7.2f}M {precision:<9} {seconds * 1e3:>9.1f} "
                f"{samples_per_second[precision]:>10.1f} {ratio:>7.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()

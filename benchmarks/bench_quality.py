"""Quality on held-out synthetic masked identities: distillation, mask augmentation, sample rate.

    python benchmarks/bench_quality.py --seeds 0 1

Every run is the real trainer (``python -m mfr.trainer``, one process) on the built-in
synthetic masked faces, evaluated on held-out identities (trainer/evaluate.py) with the
masked-unmasked protocol's TPR at FPR 1e-3 as the headline.  Students all take the same
number of steps with the same data; per seed (``run.seed``: initialisation, head
sampling) it runs:

  scratch      the baseline student (mask_prob 0.35, head.sample_rate 1.0)
  distilled    the same, plus offline distillation from a larger teacher, trained first
               in this script for more steps and extracted with ``mfrctl distill extract``
  no-mask      the baseline with data.mask_prob 0 (no mask augmentation)
  sr-0.1       the baseline with head.sample_rate 0.1

The teacher is trained once (seed 0).  Results are printed as a Markdown table, and all
numbers are kept in ``<workdir>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

DATA = [
    "head.num_classes=256",
    "data.images_per_identity=16",
    "data.num_workers=0",
    "eval.num_identities=50",
    "eval.images_per_identity=8",
    "eval.fprs=[0.1, 0.01, 0.001, 0.0001]",
    "eval.at_start=false",
    "metrics.enabled=false",
    "checkpoint.every_steps=null",
    "checkpoint.resume=never",
]
STUDENT = ["model.backbone=tiny", "model.embedding_size=64"]
TEACHER = ["model.backbone=r18", "model.width=0.0625", "model.embedding_size=128"]
TEACHER_ARCH = ["distill.teacher.backbone=r18", "distill.teacher.width=0.0625", "distill.teacher.embedding_size=128"]


def train(run_dir: Path, overrides: list[str]) -> dict:
    """One training run; returns its held-out results (protocol -> {fpr: tpr}) and wall time."""
    run_dir.mkdir(parents=True, exist_ok=True)
    events = run_dir / "events.jsonl"
    events.unlink(missing_ok=True)
    env = {**os.environ, "MFR_EVENTS_FILE": str(events)}
    args = [
        sys.executable,
        "-m",
        "mfr.trainer",
        *[a for o in overrides for a in ("--set", o)],
        "--set",
        f"run.output_dir={run_dir}",
    ]
    started = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
        subprocess.run(args, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    seconds = time.perf_counter() - started
    for line in events.read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "eval" and event["stage"] == "trained":
            results = {r["protocol"]: {f"{p['target_fpr']:g}": p["tpr"] for p in r["points"]} for r in event["results"]}
            return {"results": results, "seconds": seconds}
    raise RuntimeError(f"{run_dir}: no evaluation of the trained model in {events}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=100, help="student steps")
    parser.add_argument("--batch", type=int, default=64, help="student batch size")
    parser.add_argument("--teacher-steps", type=int, default=250, help="of batch 64; an interrupted teacher resumes")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--weight", type=float, default=16.0, help="distill.weight (lambda)")
    parser.add_argument("--variants", nargs="+", default=["scratch", "distilled", "no-mask", "sr-0.1"])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-quality"))
    args = parser.parse_args()
    work = args.workdir
    schedule = [f"run.steps={args.steps}", f"optim.warmup_steps={args.steps // 10}", f"data.batch_size={args.batch}"]

    teacher_ckpt = work / "teacher" / "checkpoints"
    features = work / "teacher-features"
    all_results: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "args": {k: str(v) for k, v in vars(args).items()},
        "runs": {},
    }
    if (work / "results.json").exists():  # a later invocation (more seeds) adds to the earlier runs
        all_results["runs"] = json.loads((work / "results.json").read_text())["runs"]
    if "distilled" in args.variants and not (features / "index.json").exists():
        teacher = train(
            work / "teacher",
            [
                *DATA,
                *TEACHER,
                f"run.steps={args.teacher_steps}",
                "data.batch_size=64",
                "optim.warmup_steps=25",
                "run.seed=0",
                "checkpoint.resume=auto",
            ],
        )
        all_results["runs"]["teacher"] = teacher
        print(f"teacher: {json.dumps(teacher)}", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mfr.ctl.main",
                "distill",
                "extract",
                "--teacher",
                str(teacher_ckpt),
                "--out",
                str(features),
                "-j",
                "0",
                *[a for o in (*DATA, *TEACHER_ARCH) for a in ("--set", o)],
            ],
            check=True,
        )
    variants = {
        "scratch": [],
        "distilled": [
            "distill.mode=offline",
            f"distill.features={features}",
            f"distill.alpha={args.alpha}",
            f"distill.weight={args.weight}",
            *TEACHER_ARCH,
        ],
        "no-mask": ["data.mask_prob=0"],
        "sr-0.1": ["head.sample_rate=0.1"],
    }
    for seed in args.seeds:
        for name in args.variants:
            overrides = [*DATA, *STUDENT, *schedule, f"run.seed={seed}", *variants[name]]
            result = train(work / f"{name}-seed{seed}", overrides)
            all_results["runs"][f"{name}-seed{seed}"] = result
            print(f"{name} seed {seed}: {json.dumps(result)}", flush=True)
            (work / "results.json").write_text(json.dumps(all_results, indent=1))

    print(f"\n{all_results['machine']}; student tiny/64-d, {args.steps} steps of batch {args.batch}; held-out TPR")
    print("| variant | protocol | TPR@1e-3 per seed | mean | TPR@1e-2 per seed | mean |")
    print("|---|---|---|---|---|---|")
    runs = all_results["runs"]
    for name in [*variants, "teacher"]:
        seeds = sorted(k for k in runs if k.rsplit("-seed", 1)[0] == name)
        for protocol in ("masked-unmasked", "unmasked-unmasked", "masked-masked") if seeds or name in runs else ():
            points = [runs[k]["results"][protocol] for k in seeds or [name]]
            cells = []
            for fpr in ("0.001", "0.01"):
                values = [p[fpr] for p in points]
                cells += [" / ".join(f"{v:.4f}" for v in values), f"{statistics.mean(values):.4f}"]
            print(f"| {name} | {protocol} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()

"""ONNX export of full-size backbones: does the 1e-4 check hold, how long does it take, what does it buy?

    python benchmarks/bench_export.py [--backbones r50 r100] [--batch 16] [--repeats 5]

The tests export the tiny backbone; this exports real depths.  A fresh model's
BatchNorm statistics are 0/1, so each model is first calibrated: forward passes
in train mode over synthetic faces with cumulative running statistics, which
gives every BN the scale of its real input, as training would.  Then, as
``mfrctl export`` does: fold, export, and compare onnxruntime with the unfolded
torch model on noise and on synthetic faces (the max |difference| it reports);
next to it, the folded torch model against the unfolded one, and torch fp32
against the same model in fp64: the rounding noise any fp32 runtime has.
Last, inference latency on one batch: the unfolded torch model (the baseline,
in this run), the folded torch model, and onnxruntime; median of --repeats.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from mfr.trainer.data.synthetic import SyntheticFaces
from mfr.trainer.export import MAX_ABS_DIFF, fold_batchnorm, onnx_max_abs_diff, to_onnx, verification_inputs
from mfr.trainer.models import build_backbone


def _calibrated(name: str, batches: int, batch: int) -> nn.Module:
    torch.manual_seed(0)
    model = build_backbone(name)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average over the calibration batches
    faces = SyntheticFaces(num_identities=batch, images_per_identity=batches, seed=1)
    model.train()
    with torch.no_grad():
        for b in range(batches):
            model(torch.stack([faces[i * batches + b][0] for i in range(batch)]))
    return model.eval()


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["r50"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import onnxruntime

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {torch.get_num_threads()} threads")
    for name in args.backbones:
        model = _calibrated(name, args.calibration_batches, args.batch)
        start = time.perf_counter()
        folded = fold_batchnorm(model)
        fold_s = time.perf_counter() - start
        start = time.perf_counter()
        onnx_model = to_onnx(folded, {})
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        inputs = verification_inputs()
        diffs = onnx_max_abs_diff(onnx_model, model, inputs)
        verify_s = time.perf_counter() - start
        with torch.no_grad():
            scale = float(model(inputs["synthetic faces"]).abs().max())
            folding = max(float((folded(x) - model(x)).abs().max()) for x in inputs.values())
            exact = copy.deepcopy(model).double()  # torch's own fp32 rounding: |fp32 - fp64|
            noise_floor = {k: float((model(x).double() - exact(x.double())).abs().max()) for k, x in inputs.items()}
            del exact

        images = inputs["synthetic faces"].repeat(args.batch // 8 + 1, 1, 1, 1)[: args.batch]
        session = onnxruntime.InferenceSession(onnx_model, providers=["CPUExecutionProvider"])
        with torch.no_grad():  # each lambda runs here, within its loop turn
            eager = _median_seconds(lambda: model(images), args.repeats)  # noqa: B023
            eager_folded = _median_seconds(lambda: folded(images), args.repeats)  # noqa: B023
        ort = _median_seconds(lambda: session.run(None, {"images": images.numpy()}), args.repeats)  # noqa: B023

        verdict = "ok" if max(diffs.values()) <= MAX_ABS_DIFF else "OVER 1e-4"
        print(
            f"{name}: {len(onnx_model) / 2**20:.0f} MiB ONNX; fold {fold_s:.2f} s, export {export_s:.1f} s, "
            f"verify {verify_s:.1f} s; max |onnx - torch| "
            + ", ".join(f"{d:.1e} on {k}" for k, d in diffs.items())
            + f" ({verdict}; largest embedding value {scale:.1f})"
        )
        print(
            f"  torch folded vs unfolded {folding:.1e}; torch fp32 vs fp64 (its own rounding) "
            + ", ".join(f"{d:.1e} on {k}" for k, d in noise_floor.items())
        )
        print(
            f"  batch {args.batch} latency: torch unfolded {eager * 1e3:.0f} ms (1.00), "
            f"torch folded {eager_folded * 1e3:.0f} ms ({eager_folded / eager:.2f}), "
            f"onnxruntime {ort * 1e3:.0f} ms ({ort / eager:.2f})"
        )


if __name__ == "__main__":
    main()

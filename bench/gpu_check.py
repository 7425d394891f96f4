"""First run on a GPU node: are the GPU engines right, and how fast are they? (no network, no Ray)

For every engine available here it prints one table row:

- **parity** against ONNX Runtime on CPU (fp32, the reference): every Lytro pair (20) and triple (4)
  is fused by both (:class:`ray_mff.fusion.model_fuser.ModelFuser`, the production fuser:
  calibrated triples, features kept on the device) and the fused 8-bit images compared. fp32
  engines pass with every pixel within 1 grey level; fp16 engines with at least 99.9 % of the
  pixels within 1 grey level and none off by more than 3 (the fp16 bound of :mod:`ray_mff.export`);
- **pairs/s** of :meth:`ModelFuser.fuse_batch <ray_mff.fusion.model_fuser.ModelFuser.fuse_batch>`
  (what the pipeline's fusion actors call) at batch 1, 4 and 16 Lytro pairs per engine call (one
  encode of all 2B images, one decide of the B pairs), colour in and fused colour out: the per-pair
  CPU work after ``decide`` (blend, luminance) is counted, as in production;
- **stack_v4** wall time: the 65-image 1600 x 1200 stack fused (calibrated);
- **peak memory**: GPU memory torch allocated at most (TensorRT's context memory and features are
  torch tensors; ONNX Runtime's own CUDA arena is not counted), or peak RSS on ``--device cpu``.

Then the default model, which is stack-native (``--stack-model``, default ``stacknet_s``): its
:class:`~ray_mff.fusion.stack_fuser.StackFuser` on torch (the engine ``--engine auto`` picks on a
GPU node; no TensorRT plans for stack models yet) against the same fuser on ONNX Runtime CPU:
fp32 parity on the same Lytro pairs and triples (every pixel within 1 grey level), the
stack_v4 wall time and peak memory.

The last line is ``gpu_check: OK`` or ``gpu_check: FAIL <reason>`` (exit 0 / 1).

    python bench/gpu_check.py                       # GPU node: tensorrt fp32/fp16, torch cuda fp32/fp16, onnxruntime-cuda
    python bench/gpu_check.py --device cpu --limit 2 --size 128 --batches 1,2 --stack-limit 3   # CPU smoke run (the test)

Data: ``--data`` (default ``../shared/data`` beside the repository); without it the parity check
uses the repository's ``examples/`` stacks and the stack_v4 column says "no data".
"""
from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ray_mff import io  # noqa: E402
from ray_mff.fusion.model_fuser import ModelFuser  # noqa: E402

#: fused 8-bit images: fp32 engines must agree with ONNX Runtime CPU everywhere within this
FP32_MAX_GREY = 1
#: fp16 engines: at least this fraction of pixels within 1 grey level, and none beyond FP16_MAX_GREY
FP16_WITHIN_1 = 0.999
FP16_MAX_GREY = 3


def _stacks(data: Path | None, limit: int | None) -> tuple[list[tuple[str, list[str]]], str]:
    """(name, image paths) of the Lytro pairs and triples, or the repository's examples."""
    if data is not None and (data / "lytro").is_dir():
        pairs = [(f"lytro_{i:02d}", [str(data / "lytro" / f"lytro_{i:02d}_{s}.png") for s in "AB"])
                 for i in range(1, 21)]
        triples = [(f"lytro-{i:02d}", [str(data / "lytro_triple" / f"lytro-{i:02d}-{s}.jpg") for s in "ABC"])
                   for i in range(1, 5)]
        source = f"{data}: 20 Lytro pairs + 4 triples"
    else:
        ex = REPO / "examples"
        pairs = [(p.name[:-6], [str(p), str(p).replace("_A.png", "_B.png")]) for p in sorted(ex.glob("*_A.png"))]
        triples = [("lytro-01", [str(ex / f"lytro-01-{s}.jpg") for s in "ABC"])]
        source = f"no shared data: {len(pairs)} example pairs + 1 triple from examples/"
    if limit:
        pairs, triples = pairs[:limit], triples[: max(1, limit // 2)]
    return pairs + triples, source


def _downsize(images: list[np.ndarray], size: int | None) -> list[np.ndarray]:
    if not size:
        return images
    import cv2

    return [cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in images]


def _engines(device: str, model_name: str, max_tile: int, max_batch: int):
    """Yield (label, engine or the exception that stopped its build) for every engine to check here,
    one at a time (each is built after the previous one is dropped, so peak memory is its own),
    and (label, None, reason) for engines that cannot run here."""
    from ray_mff.engines import make_engine, probe_environment
    from ray_mff.errors import EngineUnavailableError

    env = probe_environment()
    wanted = [("torch", "fp32"), ("onnx", "fp16")] if device == "cpu" else \
        [("tensorrt", "fp32"), ("tensorrt", "fp16"), ("torch", "fp32"), ("torch", "fp16"), ("onnx", "fp32")]
    for kind, precision in wanted:
        label = f"{kind} {precision}"
        try:
            eng = make_engine(model_name, engine=kind, precision=precision, device=device, env=env,
                              max_tile=max_tile, max_batch=max_batch)
        except EngineUnavailableError as err:
            yield label, None, str(err)
            continue
        except Exception as err:  # noqa: BLE001 - a GPU engine that fails to build is a finding, not a crash
            yield label, err, None
            continue
        if device != "cpu" and str(eng.device).startswith("cpu"):
            yield label, None, f"runs on {eng.device} ({eng.describe().get('providers')})"
            continue
        yield label, eng, None


def _parity(engine, reference: dict, stacks, size, precision: str) -> tuple[bool, str, float]:
    worst, beyond1, total, t0 = 0, 0, 0, time.perf_counter()
    for name, paths in stacks:
        fused = ModelFuser(engine).fuse(_downsize([io.read_image(p) for p in paths], size)).fused
        diff = np.abs(fused.astype(np.int16) - reference[name].astype(np.int16))
        worst = max(worst, int(diff.max()))
        beyond1 += int((diff > 1).sum())
        total += diff.size
    within = 1.0 - beyond1 / max(1, total)
    if precision == "fp32":
        ok = worst <= FP32_MAX_GREY
    else:
        ok = within >= FP16_WITHIN_1 and worst <= FP16_MAX_GREY
    return ok, f"max {worst}, {100 * within:.3f}% <=1", time.perf_counter() - t0


def _pairs_per_second(engine, pairs: list[list[np.ndarray]], batch: int, min_seconds: float) -> float:
    """Fused pairs per second through ``fuse_batch`` with exactly ``batch`` pairs per engine call."""
    fuser = ModelFuser(engine, batch_stacks=True, stack_batch_pixels=1 << 40)  # only max_batch limits
    h, w = pairs[0][0].shape[:2]
    if fuser.pairs_per_call(h, w) < batch:
        raise RuntimeError(f"engine takes {fuser.pairs_per_call(h, w)} pairs per call, not {batch}")
    stacks = [pairs[i % len(pairs)] for i in range(batch)]

    def once():
        return fuser.fuse_batch(stacks)  # numpy results: the GPU has finished

    once()  # warm-up: cuDNN autotune, TensorRT context memory, ONNX Runtime session
    n, t0 = 0, time.perf_counter()
    while True:
        once()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds and n >= 2:
            return n * batch / elapsed


def _stack_model_row(name: str, device: str, stacks, size, stack_paths, data) -> tuple[list, list[str]]:
    """(label, status, parity, stack_v4, peak memory) for a stack-native model: StackFuser on torch ``device`` vs on ONNX Runtime
    CPU (fp32: every pixel within FP32_MAX_GREY), stack_v4 time and peak memory; and failures."""
    import torch

    from ray_mff.engines.stack_engine import StackTorchEngine, make_stack_engine
    from ray_mff.fusion.stack_fuser import StackFuser
    from ray_mff.models import get_model

    net = get_model(name)
    reference, candidate = StackFuser(make_stack_engine(net, engine="onnx")), \
        StackFuser(StackTorchEngine(net, device=device))
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    worst, total, beyond = 0, 0, 0
    for _, paths in stacks:
        images = _downsize([io.read_image(q) for q in paths], size)
        diff = np.abs(candidate.fuse(images).fused.astype(np.int16) - reference.fuse(images).fused.astype(np.int16))
        worst, total, beyond = max(worst, int(diff.max())), total + diff.size, beyond + int((diff > 1).sum())
    ok = worst <= FP32_MAX_GREY
    parity = f"max {worst}, {100 * (1 - beyond / max(1, total)):.3f}% <=1"
    if stack_paths:
        images = _downsize([io.read_image(q) for q in stack_paths], size)
        candidate.fuse(images[:2])  # warm-up (cuDNN autotune)
        t0 = time.perf_counter()
        candidate.fuse(images)
        stack = f"{time.perf_counter() - t0:.2f} s ({len(stack_paths)} img)"
    else:
        stack = "no data" if data is None else "skipped"
    row = [f"{name} torch-{device} fp32", "ok" if ok else "FAIL", parity, stack, _peak_memory(device)]
    return row, ([] if ok else [f"{name} on torch {device} parity {parity}"])


def _peak_memory(device: str) -> str:
    if device == "cpu":
        return f"rss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    import torch

    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (GPU engines) or cpu (CPU engines: a smoke run)")
    p.add_argument("--model", default="cascade", help="pair model for the engine rows")
    p.add_argument("--stack-model", default="stacknet_s",
                   help="stack-native model checked through StackFuser on torch ('' = skip)")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="folder with lytro/, lytro_triple/, stack_v4/")
    p.add_argument("--limit", type=int, default=None, help="only the first N pairs (and N // 2 triples)")
    p.add_argument("--size", type=int, default=None, help="resize every image to SIZE x SIZE (faster CPU runs)")
    p.add_argument("--batches", default="1,4,16", help="pairs per engine call (fuse_batch) for pairs/s")
    p.add_argument("--seconds", type=float, default=3.0, help="time each throughput figure for at least this long")
    p.add_argument("--stack-limit", type=int, default=None, help="only the first N images of stack_v4 (0: skip)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    t_start = time.perf_counter()
    device = "cpu" if args.device.startswith("cpu") else args.device
    batches = [int(b) for b in args.batches.split(",") if b]

    import torch

    from ray_mff.engines import make_engine, probe_environment

    if device != "cpu" and not torch.cuda.is_available():
        env = probe_environment()
        print(f"gpu_check: FAIL no CUDA device ({env.cuda_missing})")
        return 1
    data = Path(args.data) if Path(args.data).is_dir() else None
    stacks, source = _stacks(data, args.limit)
    env = probe_environment()
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), device {env.cuda_device or 'cpu'}; "
          f"tensorrt {env.tensorrt_version or 'absent'}; onnxruntime providers {','.join(env.ort_providers)}"
          + (f"; WARNING {env.ort_conflict}" if env.ort_conflict else ""))
    print(f"parity data: {source}")

    # the reference: ONNX Runtime on CPU, fp32
    ref_engine = make_engine(args.model, engine="onnx", precision="fp32", device="cpu")
    reference = {name: ModelFuser(ref_engine).fuse(_downsize([io.read_image(q) for q in paths], args.size)).fused
                 for name, paths in stacks}
    pairs = [_downsize([io.read_image(q) for q in paths], args.size) for _, paths in stacks if len(paths) == 2][:4]

    stack_paths = sorted((data / "stack_v4").glob("V*.jpg")) if data is not None else []
    if args.stack_limit is not None:
        stack_paths = stack_paths[: args.stack_limit]
    max_batch = 2 * max(batches + [2])  # both images of the largest batch in one encode call
    rows, failures, notes = [], [], []
    for label, eng, skipped in _engines(device, args.model, max_tile=2048, max_batch=max_batch):
        if skipped:
            notes.append(f"{label}: skipped ({skipped})")
            continue
        if isinstance(eng, Exception):
            failures.append(f"{label} did not build: {eng}")
            rows.append([label, "BUILD FAILED", "-"] + ["-"] * len(batches) + ["-", "-"])
            continue
        if device != "cpu":
            torch.cuda.reset_peak_memory_stats()
        precision = label.split()[-1]
        ok, parity, _ = _parity(eng, reference, stacks, args.size, precision)
        if not ok:
            failures.append(f"{label} parity {parity}")
        speeds = [f"{_pairs_per_second(eng, pairs, b, args.seconds):.1f}" for b in batches]
        if stack_paths:
            t0 = time.perf_counter()
            ModelFuser(eng).fuse(_downsize([io.read_image(q) for q in stack_paths], args.size))
            stack = f"{time.perf_counter() - t0:.2f} s ({len(stack_paths)} img)"
        else:
            stack = "no data" if data is None else "skipped"
        rows.append([label, "ok" if ok else "FAIL", parity] + speeds + [stack, _peak_memory(device)])
        del eng
        if device != "cpu":
            torch.cuda.empty_cache()
    stack_row = _stack_model_row(args.stack_model, device, stacks, args.size, stack_paths, data) \
        if args.stack_model else None
    if stack_row is not None:  # no pairs/s: fuse_batch is the pair models' batched path
        label, status, parity, stack, peak = stack_row[0]
        rows.append([label, status, parity] + ["-"] * len(batches) + [stack, peak])
        failures += stack_row[1]
    for note in notes:
        print(note)
    if not rows:
        print("gpu_check: FAIL no engine to check on " + device)
        return 1

    header = ["engine", "parity", "vs onnxruntime-cpu fp32"] + [f"pairs/s b{b}" for b in batches] + \
             ["stack_v4", "peak memory"]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    print(f"({time.perf_counter() - t_start:.0f} s in all)")
    if failures:
        print("gpu_check: FAIL " + "; ".join(failures))
        return 1
    print("gpu_check: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())

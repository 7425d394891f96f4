"""Ray Train loop for the fusion models: data-parallel TorchTrainer, checkpoints, resume, export.

One function per concern:

- :func:`train_loop_per_worker` runs on every Ray Train worker: it builds the model
  (``ray.train.torch.prepare_model`` wraps it in DDP: gloo on CPU, NCCL on GPU), reads image uris
  from its Ray Data shard (``ray.train.get_dataset_shard("train")``), makes its training batches on
  the fly (seeded by (seed, step, rank) so a resumed run sees the same data it would have seen),
  minimises its loss -- both chosen by the model's objective (:mod:`ray_mff.train.objectives`:
  synthetic focus pairs and the gradient-aware loss of :mod:`ray_mff.train.losses` for
  ``cascade``; SSIM losses or patch classification for the other models) -- and calls ``ray.train.report`` with the loss terms; every
  ``checkpoint_every`` steps rank 0 also attaches a checkpoint (model + optimiser + step + the
  best weights so far, by validation loss on a fixed synthetic set made from held-out images).
- :func:`run_training` builds the ``TorchTrainer``: ``ScalingConfig(num_workers, use_gpu)``,
  ``RunConfig(name, storage_path, storage_filesystem)`` where storage is a local folder or an
  ``s3://`` prefix (a pyarrow ``S3FileSystem`` with ``endpoint_override`` for S3-compatible
  stores). Re-running with the same ``name`` and ``storage_path`` resumes: Ray Train V2 reloads
  the run's checkpoint snapshot from storage and ``ray.train.get_checkpoint()`` hands the latest
  checkpoint to the workers. The same happens within a run after a worker crash
  (``FailureConfig(max_failures)``). At the end the best weights are exported in the shipped
  safetensors format (:func:`ray_mff.models.save_weights`).
- :func:`add_train_arguments` / :func:`main`: the command line (``jobs/train.py``, ``ray-mff train``).

The same code runs on a laptop (2 CPU workers) and a GPU cluster (``--use-gpu``, more workers).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import tempfile
import time
from typing import Any, Sequence
from urllib.parse import urlparse

import numpy as np

from ray_mff.train.synthetic_pairs import DEFAULT_TRAIN_ROOT, DEFAULT_VAL_ROOT

DEFAULTS: dict[str, Any] = {
    "model": "cascade",
    "model_config": {},
    "data": DEFAULT_TRAIN_ROOT,  # held-out BSDS500 val makes the validation pairs; never trained on
    "val_data": DEFAULT_VAL_ROOT,
    "val_pairs": 16,
    "s3_endpoint": None,
    "steps": 1000,
    "batch_size": 8,  # per worker
    "patch": 128,
    "lr": 2e-3,
    "weight_decay": 0.0,
    "warmup_steps": 20,
    "qg_weight": 1.0,
    "grad_clip": 1.0,
    "seed": 0,
    "repeat": 4,  # each image appears this many times per Ray Data epoch (longer epochs, less overhead)
    "report_every": 10,
    "checkpoint_every": 100,
    "num_workers": 2,
    "use_gpu": False,
    "cpus_per_worker": 1,
    "storage_path": "runs",
    "name": "cascade",
    "max_failures": 0,
    "export": None,  # where to write the best weights (.safetensors); None: <storage>/<name>/<model>.safetensors
    "init_weights": None,  # optional safetensors file to start from (fine-tuning)
    "torch_threads": None,  # intra-op threads per worker (None: torch's default); 1 leaves cores to others
    "resume_file": None,  # one-file training state (ray_mff.train.resume_file): read to resume, rewritten at checkpoints
    "log_csv": None,  # append every report's metrics to this CSV (rank 0)
    "data_workers": None,  # DataLoader processes making batches per training worker (None: 2 on GPU, else CPUs - 1)
    "train_only": None,  # parameter-name prefixes to train (e.g. ["fused_net"]); every other parameter frozen
    "loss_weights": None,  # {term: weight} for the objective's loss (e.g. {"grad": 0.0}); None: its defaults
    "photons": None,  # stack_truth data: (lo, hi) photon counts at full scale; None: synthetic_stacks.PHOTONS
    "read_noise": None,  # stack_truth data: largest read noise; None: synthetic_stacks.READ_NOISE
}


# --------------------------------------------------------------------------- storage


def storage_filesystem(storage_path: str, s3_endpoint: str | None = None):
    """(pyarrow filesystem or None, path for RunConfig) for a local folder or ``s3://`` prefix.

    For ``s3://`` with an endpoint override (argument, else ``AWS_ENDPOINT_URL_S3`` /
    ``AWS_ENDPOINT_URL``) a ``pyarrow.fs.S3FileSystem(endpoint_override=..., scheme=...)`` is built
    and the path loses its ``s3://`` prefix, as ``RunConfig(storage_filesystem=...)`` requires.
    Credentials come from the usual AWS environment variables.
    """
    from ray_mff import storage

    if not storage_path.startswith("s3://"):
        return None, os.path.abspath(storage_path) if "://" not in storage_path else storage_path
    endpoint = s3_endpoint or storage.s3_endpoint_from_env()
    if not endpoint:
        return None, storage_path
    from pyarrow import fs as pafs

    u = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    # No credentials here: this filesystem is pickled to every train worker, and the driver's keys
    # must not travel with it (nor land in Ray's object store). Each worker's pyarrow finds its own
    # in its environment, ~/.aws or the instance role, as every other worker does.
    fs = pafs.S3FileSystem(endpoint_override=u.netloc, scheme=u.scheme or "https",
                           region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    return fs, storage_path[len("s3://"):]


# --------------------------------------------------------------------------- worker side


def _lr_at(step: int, cfg: dict) -> float:
    """Linear warm-up then cosine decay to 5% of the peak rate over ``steps``."""
    if step < cfg["warmup_steps"]:
        return cfg["lr"] * (step + 1) / cfg["warmup_steps"]
    t = (step - cfg["warmup_steps"]) / max(1, cfg["steps"] - cfg["warmup_steps"])
    return cfg["lr"] * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _validation_set(cfg: dict, objective) -> dict[str, np.ndarray] | None:
    """A fixed batch of the objective's data from the held-out images (same for every run with this seed)."""
    from ray_mff.io import read_image
    from ray_mff.train.synthetic_pairs import list_images

    if not cfg.get("val_data") or not cfg.get("val_pairs"):
        return None
    uris = list_images(cfg["val_data"], s3_endpoint=cfg["s3_endpoint"])
    if not uris:
        return None
    rng = np.random.default_rng([cfg["seed"], 999])
    pick = [uris[i] for i in rng.choice(len(uris), size=min(cfg["val_pairs"], len(uris)), replace=False)]
    images = [read_image(u, s3_endpoint=cfg["s3_endpoint"]) for u in pick]
    return objective.make_batch(images, rng, cfg)


def _append_csv(path: str, metrics: dict) -> None:
    """Append one report to a CSV of losses; the header (the first report's numeric keys, then
    their ``val_`` versions) is written when the file is new."""
    import csv

    exists = os.path.exists(path) and os.path.getsize(path) > 0
    if exists:
        with open(path, newline="") as f:
            columns = next(csv.reader(f))
    else:
        terms = [k for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not k.startswith("val_") and k != "best_val"]
        columns = terms + [f"val_{k}" for k in terms if k not in ("step", "lr", "wall_s", "resumed_from",
                                                                      "best_val")] + ["best_val"]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if not exists:
            w.writeheader()
        w.writerow({k: metrics.get(k, "") for k in columns})


def freeze_except(model, prefixes: Sequence[str] | None) -> tuple[int, int]:
    """Freeze (``requires_grad = False``) every parameter whose name starts with none of
    ``prefixes`` (``None`` or empty: train everything) -> (trainable, total) parameter counts.
    Raises ValueError when a prefix matches no parameter (a typo would otherwise train nothing)."""
    named = list(model.named_parameters())
    if prefixes:
        for p in prefixes:
            if not any(n.startswith(p) for n, _ in named):
                raise ValueError(f"--train-only {p!r} matches no parameter of {type(model).__name__}; "
                                 f"top-level modules: {', '.join(sorted({n.split('.')[0] for n, _ in named}))}")
        for n, t in named:
            t.requires_grad_(any(n.startswith(p) for p in prefixes))
    trainable = sum(t.numel() for _, t in named if t.requires_grad)
    return trainable, sum(t.numel() for _, t in named)


def _state_to_cpu(model) -> dict:
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker function (see module docstring). ``config``: :data:`DEFAULTS` keys."""
    import torch

    import ray.train
    import ray.train.torch
    from ray_mff.models import build_model, load_weights, save_weights
    from ray_mff.train.loader import step_uris, synthetic_batches
    from ray_mff.train.objectives import objective_for

    cfg = {**DEFAULTS, **config}
    if cfg.get("torch_threads"):
        import cv2

        torch.set_num_threads(int(cfg["torch_threads"]))
        cv2.setNumThreads(int(cfg["torch_threads"]))
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(cfg["seed"])  # same init on every rank (DDP also broadcasts rank 0's weights)
    net = build_model(cfg["model"], **cfg["model_config"])
    if cfg.get("init_weights"):
        load_weights(cfg["init_weights"], net)
    objective = objective_for(net)  # the model's training data and loss (ray_mff.train.objectives)
    objective.check_loss_weights(cfg.get("loss_weights"))
    trainable, total = freeze_except(net, cfg.get("train_only"))
    if rank == 0:
        print(f"[train] {trainable:,} of {total:,} parameters trainable"
              + (f" (--train-only {','.join(cfg['train_only'])})" if cfg.get("train_only") else ""), flush=True)
    device = ray.train.torch.get_device()

    start_step, best_val, best_state, wall_before = 0, math.inf, None, 0.0
    opt_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        from safetensors.torch import load_file

        with checkpoint.as_directory() as d:
            net.load_state_dict(load_file(os.path.join(d, "model.safetensors")))
            if os.path.exists(os.path.join(d, "best.safetensors")):
                best_state = load_file(os.path.join(d, "best.safetensors"))
            opt_state = torch.load(os.path.join(d, "optimizer.pt"), map_location="cpu", weights_only=True)
            with open(os.path.join(d, "state.json")) as f:
                st = json.load(f)
        start_step, best_val, wall_before = st["step"], st.get("best_val", math.inf), st.get("wall_s", 0.0)
        if rank == 0:
            print(f"[train] resuming from step {start_step} (best val {best_val:.4f})", flush=True)
    elif cfg.get("resume_file") and os.path.exists(cfg["resume_file"]):
        from ray_mff.train.resume_file import load_resume_file

        model_state, best_state, opt_state, st = load_resume_file(cfg["resume_file"])
        net.load_state_dict(model_state)
        start_step, best_val, wall_before = st["step"], st.get("best_val", math.inf), st.get("wall_s", 0.0)
        if rank == 0:
            print(f"[train] resuming from {cfg['resume_file']} at step {start_step}", flush=True)

    model = ray.train.torch.prepare_model(net)
    # frozen parameters get no gradient, no optimiser state and no weight decay: they stay as loaded
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    val = _validation_set(cfg, objective) if rank == 0 else None

    shard = ray.train.get_dataset_shard("train")
    sums: dict[str, float] = {}
    count = 0
    step = start_step
    t0 = time.time()
    model.train()
    # Decoding and pair synthesis run ahead of the loop in DataLoader workers (ray_mff.train.loader),
    # so the GPU is not idle between steps; the batches are the same for any number of workers.
    workers = cfg["data_workers"]
    if workers is None:
        workers = 2 if cfg["use_gpu"] else max(0, int(cfg["cpus_per_worker"]) - 1)
    batches = synthetic_batches(step_uris(shard, cfg["batch_size"], start_step, cfg["steps"]), objective.make_batch,
                                cfg, rank=rank, workers=workers, pin_memory=device.type == "cuda")
    with contextlib.closing(batches):  # stops the DataLoader workers however the loop ends
        for step_done, batch in batches:
            assert step_done == step
            b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, cfg)
            terms = objective.loss(model, b, cfg)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if cfg["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
            opt.step()
            step += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            count += 1

            last = step >= cfg["steps"]
            if step % cfg["report_every"] and not last:
                continue
            metrics = {k: v / count for k, v in sums.items()}
            metrics.update(step=step, lr=_lr_at(step - 1, cfg), wall_s=wall_before + time.time() - t0,
                           resumed_from=start_step)
            sums, count = {}, 0
            ckpt = None
            if step % cfg["checkpoint_every"] == 0 or last:
                raw = model.module if hasattr(model, "module") else model
                if rank == 0:
                    if val is not None:
                        raw.eval()
                        with torch.no_grad():
                            vb = {k: torch.from_numpy(v).to(device) for k, v in val.items()}
                            vt = objective.loss(raw, vb, cfg)
                        raw.train()
                        metrics.update({f"val_{k}": float(v) for k, v in vt.items()})
                        if metrics["val_loss"] < best_val:
                            best_val, best_state = metrics["val_loss"], _state_to_cpu(raw)
                    elif best_state is None or last:
                        best_state = _state_to_cpu(raw)
                    metrics["best_val"] = best_val
                    ckpt_dir = tempfile.mkdtemp(prefix="ray_mff_ckpt_")
                    from safetensors.torch import save_file

                    save_file(_state_to_cpu(raw), os.path.join(ckpt_dir, "model.safetensors"))
                    save_file(best_state, os.path.join(ckpt_dir, "best.safetensors"))
                    save_weights(raw, os.path.join(ckpt_dir, f"{cfg['model']}.safetensors"), {"step": step},
                                 name=cfg["model"])
                    torch.save(opt.state_dict(), os.path.join(ckpt_dir, "optimizer.pt"))
                    with open(os.path.join(ckpt_dir, "state.json"), "w") as f:
                        json.dump({"step": step, "best_val": best_val, "wall_s": metrics["wall_s"]}, f)
                    ckpt = ray.train.Checkpoint.from_directory(ckpt_dir)
                    if cfg.get("resume_file"):
                        from ray_mff.train.resume_file import save_resume_file

                        save_resume_file(cfg["resume_file"], raw, opt, best_state,
                                         {"step": step, "best_val": best_val, "wall_s": metrics["wall_s"],
                                          "model": cfg["model"], "config": cfg["model_config"]})
            if rank == 0 and cfg.get("log_csv"):
                _append_csv(cfg["log_csv"], metrics)
            if rank == 0:
                print("[train] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in metrics.items()), flush=True)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{step:07d}" if ckpt else None)
            if last:
                break


# --------------------------------------------------------------------------- driver side


def run_training(config: dict) -> dict:
    """Train with Ray Train and export the best weights. ``config``: any :data:`DEFAULTS` keys.

    Returns dict: ``metrics`` (last reported), ``checkpoint`` (path of the latest checkpoint),
    ``weights`` (uri of the exported safetensors file), ``wall_s``, ``storage`` (run folder).
    """
    import ray.data
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_mff.train.synthetic_pairs import list_images

    cfg = {**DEFAULTS, **{k: v for k, v in config.items() if v is not None or k in ("export",)}}
    _check_model_options(cfg)  # a typo in --train-only or --loss-weights fails here, not in a worker
    if cfg.get("init_weights") and "://" not in str(cfg["init_weights"]):
        # workers run in their own working directory: hand them an absolute path
        cfg["init_weights"] = os.path.abspath(cfg["init_weights"])
    uris = list_images(cfg["data"], s3_endpoint=cfg["s3_endpoint"])
    if not uris:
        raise FileNotFoundError(f"{cfg['data']}: no training images")
    rng = np.random.default_rng(cfg["seed"])
    items = [str(uris[i]) for _ in range(int(cfg["repeat"])) for i in rng.permutation(len(uris))]
    ray.data.DataContext.get_current().enable_progress_bars = False  # keep training logs readable
    dataset = ray.data.from_items([{"uri": u} for u in items])

    fs, path = storage_filesystem(str(cfg["storage_path"]), cfg["s3_endpoint"])
    resources = {"CPU": cfg["cpus_per_worker"]}
    if cfg["use_gpu"]:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=int(cfg["num_workers"]), use_gpu=bool(cfg["use_gpu"]),
                                     resources_per_worker=resources),
        run_config=RunConfig(name=cfg["name"], storage_path=path, storage_filesystem=fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=int(cfg["max_failures"]))),
        datasets={"train": dataset},
    )
    t0 = time.time()
    result = trainer.fit()
    wall = time.time() - t0
    out = {"metrics": dict(result.metrics or {}), "checkpoint": result.checkpoint.path if result.checkpoint else None,
           "wall_s": wall, "storage": f"{cfg['storage_path'].rstrip('/')}/{cfg['name']}", "weights": None}
    if result.checkpoint is not None:
        out["weights"] = export_best(result.checkpoint, cfg, out["metrics"])
    return out


def _check_model_options(cfg: dict) -> None:
    from ray_mff.models import build_model
    from ray_mff.train.objectives import objective_for

    net = build_model(cfg["model"], **cfg["model_config"])
    objective_for(net).check_loss_weights(cfg.get("loss_weights"))
    freeze_except(net, cfg.get("train_only"))


def export_best(checkpoint, cfg: dict, metrics: dict) -> str:
    """Write the checkpoint's best weights as the shipped safetensors format; returns the uri."""
    from safetensors.torch import load_file

    from ray_mff import storage
    from ray_mff.models import build_model, save_weights

    export = cfg.get("export") or f"{str(cfg['storage_path']).rstrip('/')}/{cfg['name']}/{cfg['model']}.safetensors"
    with checkpoint.as_directory() as d:
        net = build_model(cfg["model"], **cfg["model_config"])
        net.load_state_dict(load_file(os.path.join(d, "best.safetensors")))
    meta = {
        "trained_steps": metrics.get("step"),
        "train_data": cfg["data"],
        "val_data": cfg["val_data"],
        "patch": cfg["patch"],
        "batch_size_per_worker": cfg["batch_size"],
        "num_workers": cfg["num_workers"],
        "lr": cfg["lr"],
        "qg_weight": cfg["qg_weight"],
        "init_weights": cfg.get("init_weights"),
        "train_only": cfg.get("train_only"),
        "loss_weights": cfg.get("loss_weights"),
        "photons": cfg.get("photons"),
        "read_noise": cfg.get("read_noise"),
        "seed": cfg["seed"],
        "best_val_loss": metrics.get("best_val"),
        "final_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
    }
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, f"{cfg['model']}.safetensors")
        save_weights(net, local, meta, name=cfg["model"])
        with open(local, "rb") as f:
            data = f.read()
    if storage.is_remote(export):
        storage.write_bytes_atomic(export, data, s3_endpoint=cfg["s3_endpoint"])
    else:
        os.makedirs(os.path.dirname(os.path.abspath(export)), exist_ok=True)
        tmpf = export + ".tmp"
        with open(tmpf, "wb") as f:
            f.write(data)
        os.replace(tmpf, export)
    return export


# --------------------------------------------------------------------------- command line


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the training options to ``parser`` (shared by ``jobs/train.py`` and ``ray-mff train``)."""
    d = DEFAULTS
    parser.add_argument("--data", default=d["data"], help="folder or s3:// prefix of all-in-focus training images")
    parser.add_argument("--val-data", default=d["val_data"], help="held-out images for validation pairs ('' = none)")
    parser.add_argument("--model", default=d["model"], help="registered model name")
    parser.add_argument("--model-config", default="{}", help="JSON of architecture options")
    parser.add_argument("--steps", type=int, default=d["steps"], help="optimiser steps (total, across resumes)")
    parser.add_argument("--batch-size", type=int, default=d["batch_size"], help="pairs per worker per step")
    parser.add_argument("--patch", type=int, default=d["patch"], help="training patch size (pixels)")
    parser.add_argument("--lr", type=float, default=d["lr"])
    parser.add_argument("--qg-weight", type=float, default=d["qg_weight"], help="weight of (1 - Q_G) in the loss")
    parser.add_argument("--seed", type=int, default=d["seed"])
    parser.add_argument("--num-workers", type=int, default=d["num_workers"], help="Ray Train workers")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    parser.add_argument("--cpus-per-worker", type=float, default=d["cpus_per_worker"])
    parser.add_argument("--data-workers", type=int, default=None,
                        help="DataLoader processes decoding images and making pairs ahead of each training "
                             "worker's loop (default: 2 with --use-gpu, else CPUs per worker - 1)")
    parser.add_argument("--storage-path", default=d["storage_path"], help="local folder or s3:// prefix for checkpoints")
    parser.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (else AWS_ENDPOINT_URL[_S3])")
    parser.add_argument("--name", default=d["name"], help="run name; rerun with the same name to resume")
    parser.add_argument("--report-every", type=int, default=d["report_every"])
    parser.add_argument("--checkpoint-every", type=int, default=d["checkpoint_every"])
    parser.add_argument("--max-failures", type=int, default=d["max_failures"], help="worker crashes to recover from")
    parser.add_argument("--export", default=None, help="where to write the best weights (.safetensors)")
    parser.add_argument("--init-weights", default=None, help="safetensors file to start from")
    parser.add_argument("--torch-threads", type=int, default=None, help="intra-op threads per worker")
    parser.add_argument("--resume-file", default=None,
                        help="one-file training state: resumed from when no Ray checkpoint exists, rewritten at "
                             "every checkpoint (copy it anywhere to carry a run across machines)")
    parser.add_argument("--log-csv", default=None, help="append every report's losses to this CSV")
    parser.add_argument("--warmup-steps", type=int, default=d["warmup_steps"])
    parser.add_argument("--train-only", type=_prefixes, default=None, metavar="PREFIX[,PREFIX]",
                        help="train only the parameters whose names start with one of these prefixes (e.g. "
                             "fused_net: fine-tune stacknet's fused-result branch on a frozen decision)")
    parser.add_argument("--loss-weights", type=parse_loss_weights, default=None, metavar="TERM=W[,TERM=W]",
                        help="weights of the objective's loss terms, the others keep their defaults (stack_truth: "
                             "fused, blend, grad, dice, mse; e.g. fused=0,blend=0,grad=0,dice=0,mse=1)")
    parser.add_argument("--photons", type=_photons, default=None, metavar="LO,HI",
                        help="stack_truth data: photon counts at full scale of the Poisson noise, drawn "
                             "log-uniformly (default 100,10000; fewer photons, more noise)")
    parser.add_argument("--read-noise", type=float, default=None,
                        help="stack_truth data: largest Gaussian read noise (default 0.01 of full scale)")
    return parser


def _photons(text: str) -> list[float]:
    try:
        lo, hi = (float(t) for t in text.split(","))
        if not 0 < lo <= hi:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO,HI with 0 < LO <= HI") from None
    return [lo, hi]


def _prefixes(text: str) -> list[str]:
    out = [p.strip() for p in text.split(",") if p.strip()]
    if not out:
        raise argparse.ArgumentTypeError("expected PREFIX[,PREFIX...]")
    return out


def parse_loss_weights(text: str) -> dict[str, float]:
    """``"fused=1,grad=0"`` -> ``{"fused": 1.0, "grad": 0.0}`` (argparse type: a bad item is a usage error)."""
    out: dict[str, float] = {}
    for item in (t.strip() for t in text.split(",")):
        name, eq, value = item.partition("=")
        try:
            if not (eq and name.strip()):
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: expected TERM=WEIGHT (e.g. grad=0)") from None
    return out


def config_from_args(args: argparse.Namespace) -> dict:
    """argparse namespace (from :func:`add_train_arguments`) -> :func:`run_training` config."""
    return {
        "data": args.data, "val_data": args.val_data or None, "model": args.model,
        "model_config": json.loads(args.model_config), "steps": args.steps, "batch_size": args.batch_size,
        "patch": args.patch, "lr": args.lr, "qg_weight": args.qg_weight, "seed": args.seed,
        "num_workers": args.num_workers, "use_gpu": args.use_gpu, "cpus_per_worker": args.cpus_per_worker,
        "storage_path": args.storage_path, "s3_endpoint": args.s3_endpoint, "name": args.name,
        "report_every": args.report_every, "checkpoint_every": args.checkpoint_every,
        "max_failures": args.max_failures, "export": args.export, "init_weights": args.init_weights,
        "torch_threads": args.torch_threads, "resume_file": _abs(args.resume_file), "log_csv": _abs(args.log_csv),
        "warmup_steps": args.warmup_steps,
        "data_workers": args.data_workers,
        "train_only": args.train_only, "loss_weights": args.loss_weights,
        "photons": args.photons, "read_noise": args.read_noise,
    }


def _abs(path: str | None) -> str | None:
    """Workers run in their own directory: local paths travel absolute."""
    return os.path.abspath(path) if path and "://" not in path else path


def cmd_train(args: argparse.Namespace) -> int:
    """Run training from parsed :func:`add_train_arguments` options; print a JSON summary (``ray-mff train``)."""
    out = run_training(config_from_args(args))
    print(json.dumps(out, indent=2, default=str))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``jobs/train.py``: parse, train, print a JSON summary."""
    parser = add_train_arguments(argparse.ArgumentParser(prog="jobs/train.py", description=__doc__.split("\n")[0]))
    return cmd_train(parser.parse_args(argv))

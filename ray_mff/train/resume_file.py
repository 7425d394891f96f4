"""One-file resumable training state: model, optimiser, best weights and step in one safetensors file.

Ray Train's checkpoints live in a run folder that may not survive between sessions; this file is
small (a few hundred kB for ``stacknet``), written atomically next to them at every checkpoint,
and can be copied anywhere (e.g. committed in the repository) and handed back with
``--resume-file`` to continue training exactly where it stopped (same step, optimiser moments,
best-so-far weights and wall time; the data are seeded by step, so the run sees the batches it
would have seen).

Layout: tensors ``model.<name>``, ``best.<name>``, ``opt.<param index>.<state key>``; string
metadata ``state`` (JSON: step, best_val, wall_s, model, config) and ``param_groups`` (JSON).
No pickle.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def save_resume_file(path: str | os.PathLike, model, optimizer, best_state: dict | None, state: dict) -> Path:
    """Write the training state atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    for k, v in (best_state or {}).items():
        tensors[f"best.{k}"] = v.detach().to("cpu").contiguous().clone()
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for key, val in st.items():
            t = val if torch.is_tensor(val) else torch.tensor(val)
            tensors[f"opt.{idx}.{key}"] = t.detach().to("cpu").contiguous().clone()
    meta = {"state": json.dumps(state), "param_groups": json.dumps(opt["param_groups"])}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_resume_file(path: str | os.PathLike) -> tuple[dict, dict | None, dict, dict]:
    """-> (model state dict, best state dict or None, optimiser state dict, state (step, best_val, wall_s...))."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if "state" not in meta or "param_groups" not in meta:
        raise ValueError(f"{path}: not a resume file (no 'state'/'param_groups' metadata)")
    tensors = load_file(str(path), device="cpu")
    model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
    opt_state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, key = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[key] = v
    optimizer = {"state": opt_state, "param_groups": json.loads(meta["param_groups"])}
    return model, best, optimizer, json.loads(meta["state"])


def export_weights(resume: str | os.PathLike, out: str | os.PathLike, *, which: str = "model") -> Path:
    """Write the ``model`` (latest) or ``best`` weights of a resume file as a shipped-format
    safetensors file (:func:`ray_mff.models.save_weights`), e.g. to benchmark a running training::

        python -m ray_mff.train.resume_file /work/runs/stacknet/stacknet.resume.safetensors /tmp/stacknet.safetensors
    """
    from ray_mff.models import build_model, save_weights

    model, best, _, state = load_resume_file(resume)
    if which == "best":
        if best is None:
            raise ValueError(f"{resume}: holds no best weights")
        model = best
    net = build_model(state["model"], **(state.get("config") or {}))
    net.load_state_dict(model)
    return save_weights(net, out, {"trained_steps": state["step"], "weights": which,
                                   "best_val_loss": state.get("best_val"), "wall_s": state.get("wall_s")})


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="resume file -> shipped-format weights")
    p.add_argument("resume")
    p.add_argument("out")
    p.add_argument("--which", choices=("model", "best"), default="model")
    a = p.parse_args()
    print(export_weights(a.resume, a.out, which=a.which))

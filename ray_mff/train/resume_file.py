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

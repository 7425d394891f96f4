"""The one model registry: architectures by name, weights in safetensors (never pickle).

A model is a plain ``torch.nn.Module`` that knows nothing about Ray, files or engines. Each
architecture module registers itself with :func:`register_model` (importing this module, never the
package); the package ``ray_mff.models`` imports every architecture module, so by the time anyone
can reach :func:`get_model` all of them are registered. This module imports no architecture (as
torchvision keeps its registry in a module of its own), so the registry and the architectures do
not import each other. Weights files are ``safetensors`` whose string metadata carries the architecture name
(``"model"``) and its constructor config (``"config"``, JSON), so a file alone rebuilds the right
network; further metadata (training facts) rides along for the model card.

Example::

    >>> from ray_mff.models import get_model
    >>> net = get_model("cascade")                 # shipped weights, eval mode   # doctest: +SKIP
    >>> net = get_model("cascade", weights=None)   # random init, default config  # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["register_model", "get_model", "list_models", "is_stack_native", "save_weights", "load_weights",
           "read_metadata", "default_weights_path", "DEFAULT_MODEL"]

#: the model ``ray-mff fuse`` uses when none is named.
DEFAULT_MODEL = "stacknet_s"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable:
    """Class/function decorator: make ``name`` buildable by :func:`get_model`.

    The decorated callable takes the architecture config as keyword arguments; the built module
    should expose ``config() -> dict`` returning them, so :func:`save_weights` can store it.
    """

    def deco(builder):
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return deco


def list_models() -> list[str]:
    """Names of all registered architectures, sorted."""
    return sorted(_REGISTRY)


def default_weights_path(name: str) -> Path:
    """Where the package ships the weights of ``name``: ``ray_mff/models/weights/<name>.safetensors``."""
    return WEIGHTS_DIR / f"{name}.safetensors"


def build_model(name: str, **config: Any) -> nn.Module:
    """A freshly initialised (random) model ``name`` with the given config."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**config)


def is_stack_native(name: str) -> bool:
    """True for models that see the whole stack at once (``decide_stack``: run by
    :class:`ray_mff.fusion.stack_fuser.StackFuser`), False for pair models. A registered class is
    asked directly; a function builder is built once to find out."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    builder = _REGISTRY[name]
    return hasattr(builder if isinstance(builder, type) else builder(), "decide_stack")


def save_weights(model: nn.Module, path: str | os.PathLike, metadata: dict | None = None, *,
                 name: str | None = None) -> Path:
    """Write ``model``'s state dict as safetensors with its architecture in the metadata.

    metadata: extra facts (training steps, losses...). Values that are not strings are stored as
    JSON. ``name`` defaults to the model's ``registry_name`` attribute.
    """
    from safetensors.torch import save_file

    name = name or getattr(model, "registry_name", None)
    if name is None:
        raise ValueError("save_weights needs the registry name of the model (name=...)")
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
    meta["model"] = name
    meta["config"] = json.dumps(model.config() if hasattr(model, "config") else {})
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)  # atomic: a reader never sees a half-written weights file
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors weights file (``model``, ``config``, training facts)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_weights(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a safetensors weights file; build the architecture from its metadata unless ``model`` is given.

    Returns the model in eval mode on CPU.
    """
    from safetensors.torch import load_file

    meta = read_metadata(path)
    if model is None:
        if "model" not in meta:
            raise ValueError(f"{path}: no 'model' entry in the safetensors metadata")
        model = build_model(meta["model"], **json.loads(meta.get("config", "{}")))
    model.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    model.weights_metadata = meta
    return model.eval()


def get_model(name: str = DEFAULT_MODEL, weights: str | os.PathLike | None = "default") -> nn.Module:
    """Build model ``name`` in eval mode.

    weights: ``"default"`` loads the weights shipped in the package
             (``ray_mff/models/weights/<name>.safetensors``); a path loads that file (its metadata
             config decides the architecture); ``None`` gives a random init with the default config.
    """
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    if weights is None:
        return build_model(name).eval()
    path = default_weights_path(name) if str(weights) == "default" else Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no weights file for model {name!r}")
    meta = read_metadata(path)
    if meta.get("model", name) != name:
        raise ValueError(f"{path}: holds weights of model {meta['model']!r}, not {name!r}")
    return load_weights(path)

"""Fusion networks: one module per architecture, built by name from the registry.

- :mod:`.registry`: :func:`register_model`, :func:`get_model`, weights in safetensors;
- :mod:`.cascade` (the default), :mod:`.cnn_classifier`, :mod:`.ssim_net`, :mod:`.mscnn`: the
  architectures, each registering itself with :func:`ray_mff.models.registry.register_model`.

Importing this package imports every architecture module, which fills the registry.

Example::

    >>> from ray_mff.models import get_model
    >>> net = get_model("cascade")                 # shipped weights, eval mode   # doctest: +SKIP
    >>> net = get_model("cascade", weights=None)   # random init, default config  # doctest: +SKIP
"""
from __future__ import annotations

from ray_mff.models.registry import (DEFAULT_MODEL, WEIGHTS_DIR, build_model, default_weights_path, get_model,
                                     is_stack_native, list_models, load_weights, read_metadata, register_model,
                                     save_weights)
# the architectures: importing each runs its @register_model (add new architectures here)
from ray_mff.models import cascade, cnn_classifier, mscnn, ssim_net, stacknet  # noqa: E402,F401  isort: skip

__all__ = ["register_model", "get_model", "build_model", "list_models", "is_stack_native", "save_weights", "load_weights",
           "read_metadata", "default_weights_path", "DEFAULT_MODEL", "WEIGHTS_DIR"]

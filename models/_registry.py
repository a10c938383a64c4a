"""Model registry: ``create(name, **kwargs)`` and ``list_models()``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from torch import nn

__all__ = ["create", "list_models", "register_model"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model constructor under its function name."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    return fn


def _load_families() -> None:
    # importing a family module registers its models
    from importlib import import_module

    for family in _FAMILIES:
        import_module(f"{__package__}.{family}")


_FAMILIES: list[str] = ["revnet", "irevnet", "flows"]


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, sorted."""
    _load_families()
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with keyword arguments ``kwargs``."""
    _load_families()
    if name not in _MODELS:
        known = ", ".join(sorted(_MODELS)) or "none"
        raise ValueError(f"unknown model {name!r}; registered models: {known}")
    return _MODELS[name](**kwargs)

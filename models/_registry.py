"""Model registry in timm's style: ``create(name, **kwargs)``, ``list_models()``, ``model_info()``.

An entry point is a function that builds a model from keyword arguments; it passes every
keyword it does not set itself on to the model class, so ``create("revnet38", strides=[1, 2,
1])`` reaches :class:`~revtrain.models.revnet.RevNet`. Metadata is registered with it and read by
the tests, ``revtrain models`` and the tables of ``docs/models.md``::

    @register_model                                   # plain: name and family only
    def my_model(**kwargs): ...

    @register_model(input_size=(3, 32, 32), paper_params=0.46e6, paper="RevNet, Table 1")
    def revnet38(**kwargs): ...

>>> from revtrain import models
>>> models.model_info("revnet38").paper_params
460000.0
>>> models.list_models("revnet1*")
['revnet104', 'revnet110', 'revnet164']
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

__all__ = ["ModelInfo", "create", "list_models", "model_info", "register_model", "variant_of"]

#: family (the module an entry point lives in) -> what its models do
_TASKS = {"flows": "density", "conditional": "conditional density"}


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a model without building it.

    Attributes:
        name: the registered name (the entry point's function name).
        family: the module it lives in: ``"revnet"``, ``"irevnet"``, ``"flows"``, ...
        task: ``"classification"`` or ``"density"`` (flows).
        input_size: shape of one sample of the data it was made for, ``(C, H, W)`` or ``(D,)``;
            ``None`` when it takes any size.
        paper_params: parameter count the paper reports (``None``: not given).
        paper: where the configuration comes from.
        reversible: whether it has a reversible part (``False``: ``memory`` can only be
            ``"stored"``, e.g. the ResNet baselines).
        description: the first line of the entry point's docstring.
    """

    name: str
    family: str
    task: str = "classification"
    input_size: tuple[int, ...] | None = None
    paper_params: float | None = None
    paper: str | None = None
    reversible: bool = True
    description: str = ""
    entry_point: Callable[..., nn.Module] = field(default=None, repr=False, compare=False)


_MODELS: dict[str, ModelInfo] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, /, **metadata):
    """Register a model entry point under its function name, with optional metadata.

    Use as ``@register_model`` or ``@register_model(input_size=..., paper_params=...)``;
    the keywords are the fields of :class:`ModelInfo`. Returns the function unchanged.
    """
    unknown = set(metadata) - {f for f in ModelInfo.__dataclass_fields__} - {"name"}
    if unknown:
        raise TypeError(f"register_model: unknown metadata {sorted(unknown)}; use fields of "
                        f"ModelInfo: {sorted(ModelInfo.__dataclass_fields__)}")

    def register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = metadata.get("name", fn.__name__)
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        family = metadata.get("family", fn.__module__.rsplit(".", 1)[-1])
        doc = inspect.getdoc(fn) or ""
        summary = " ".join(doc.split("\n\n")[0].split())  # the first paragraph, on one line
        info = {"task": _TASKS.get(family, "classification"), "description": summary,
                **metadata, "name": name, "family": family, "entry_point": fn}
        if info.get("input_size") is not None:
            info["input_size"] = tuple(info["input_size"])
        _MODELS[name] = ModelInfo(**info)
        return fn

    return register if fn is None else register(fn)


def variant_of(base: Callable[..., nn.Module]):
    """Mark an entry point ``fn(**kwargs)`` that fills in some of ``base``'s arguments and passes
    the rest on to ``base`` (another entry point), so that ``create`` checks keywords against
    ``base``'s arguments::

        @register_model
        @variant_of(cond_realnvp)
        def cond_realnvp_digits(**kwargs): return cond_realnvp(**{"image_size": 8, **kwargs})
    """
    def mark(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        fn.__kwargs_target__ = base
        return fn

    return mark


#: the modules whose import registers the built-in models
_FAMILIES: list[str] = ["revnet", "irevnet", "flows", "conditional", "vit"]


def _load_families() -> None:
    from importlib import import_module

    for family in _FAMILIES:
        import_module(f"{__package__}.{family}")


def list_models(pattern: str = "*", family: str | None = None, task: str | None = None,
                ) -> list[str]:
    """Registered names matching a shell-style ``pattern`` (and ``family`` / ``task``), sorted."""
    _load_families()
    return sorted(n for n, i in _MODELS.items() if fnmatch.fnmatch(n, pattern)
                  and family in (None, i.family) and task in (None, i.task))


def _unknown(name: str) -> ValueError:
    close = difflib.get_close_matches(name, list(_MODELS), n=3, cutoff=0.7)
    hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    return ValueError(f"unknown model {name!r}; {hint}`revtrain models` lists the "
                      f"{len(_MODELS)} registered models")


def model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of ``name``; ``ValueError`` with close names when unknown."""
    _load_families()
    if name not in _MODELS:
        raise _unknown(name)
    return _MODELS[name]


def accepted_arguments(name: str) -> list[str]:
    """Keyword arguments ``create(name, ...)`` accepts: the entry point's and, where it passes
    ``**kwargs`` on, those of the class it returns."""
    return _arguments(model_info(name).entry_point)


def _arguments(fn: Callable) -> list[str]:
    params = inspect.signature(fn).parameters
    names = [p for p, v in params.items() if v.kind is not v.VAR_KEYWORD]
    target = getattr(fn, "__kwargs_target__", None)
    if target is not None:  # a variant of another entry point (variant_of)
        return names + [p for p in _arguments(target) if p not in names]
    if any(v.kind is v.VAR_KEYWORD for v in params.values()):
        try:
            cls = typing.get_type_hints(fn).get("return")
        except Exception:  # an annotation that does not resolve: nothing more to say
            cls = None
        if inspect.isclass(cls):
            names += [p for p in inspect.signature(cls).parameters if p not in names]
    return names


def create(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name``; ``kwargs`` go to its constructor.

    Raises:
        ValueError: unknown ``name`` (with the closest registered names).
        TypeError: an argument the model does not take (with the closest accepted ones).
    """
    fn = model_info(name).entry_point
    accepted = accepted_arguments(name)
    wrong = [k for k in kwargs if k not in accepted]
    if wrong and not _takes_anything(fn, accepted):
        hints = []
        for k in wrong:
            close = difflib.get_close_matches(k, accepted, n=1, cutoff=0.6)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(f"model {name!r} takes no argument {', '.join(hints)}; it takes "
                        f"{', '.join(accepted)}")
    return fn(**kwargs)


def _takes_anything(fn: Callable, accepted: list[str]) -> bool:
    # **kwargs whose target class could not be found: let the constructor decide
    params = inspect.signature(fn).parameters
    own = [p for p, v in params.items() if v.kind is not v.VAR_KEYWORD]
    return any(v.kind is v.VAR_KEYWORD for v in params.values()) and accepted == own

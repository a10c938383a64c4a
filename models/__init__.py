"""The model zoo, installed as ``revtrain.models``: a timm-style registry.

>>> import revtrain
>>> model = revtrain.models.create("revnet38", num_classes=10)
>>> revtrain.models.list_models()
"""

from . import conditional  # noqa: F401  (registers cinn, cond_realnvp, cond_glow, irim_toy)
from ._registry import create, list_models, register_model

__all__ = ["create", "list_models", "register_model"]

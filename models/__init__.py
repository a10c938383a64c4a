"""The model zoo, installed as ``revtrain.models``: a timm-style registry.

>>> import revtrain
>>> model = revtrain.models.create("revnet38", num_classes=10)
>>> model.memory.value
'reversible'
>>> "revnet38" in revtrain.models.list_models()
True
"""

from ._registry import ModelInfo, create, list_models, model_info, register_model

__all__ = ["ModelInfo", "create", "list_models", "model_info", "register_model"]

"""revtrain: train invertible networks without storing their activations.

A stack of invertible layers (:class:`ReversibleSequential`) keeps only its output in forward
and rebuilds every intermediate in backward, with one extra evaluation of each sub-network.

What is here (everything is imported on first use, so ``import revtrain`` is light):

* Stacks and memory modes: :class:`ReversibleSequential` (``stack(x, context=c)``);
  :class:`MemoryMode` (``"reversible"``, ``"checkpoint"``, ``"stored"``); :func:`set_memory`
  for any module; :class:`MemoryModeMixin`, the ``model.memory`` of every model in
  ``revtrain.models``; :func:`is_rebuilding` for hooks that must act once.
* Invertible layers: :class:`Coupling`, written once around an element-wise transform
  (:class:`Additive`, :class:`Affine`, :class:`SigmoidAffine` (Glow's code),
  :class:`VolumePreservingAffine` (GIN),
  :class:`RationalQuadratic` (spline); the protocol :class:`ElementwiseTransform`) and a split
  (:class:`ChannelSplit`; the protocol :class:`Split`), with the shortcuts
  :class:`AdditiveCoupling` and :class:`AffineCoupling`; :class:`Squeeze`,
  :class:`InjectivePad`, :class:`ChannelPermute`, :class:`SwapHalves`.
* Transformers: :class:`ReversibleTransformerBlock` (the two-stream Rev-ViT coupling of
  ``(B, N, 2D)`` sequences, masks as ``context``) and :class:`ReversibleTransformer` (a
  ``(B, N, D)`` encoder: streams duplicated, ``depth`` blocks, streams fused).
* Conditioning: :class:`ConditionalNet`, :func:`broadcast_context`, :class:`ConditionedStack`.
* The contract: :class:`InvertibleModule` (and its ``subnet`` hook for new layers),
  :func:`is_invertible`, :class:`ReconstructionError`.
* Subpackages: ``revtrain.models`` (registry: ``create``, ``list_models``, ``model_info``),
  ``revtrain.flows`` (flow layers), ``revtrain.memory`` (measuring and planning memory),
  ``revtrain.testing`` (``stored_twin``, ``assert_matches_stored_twin``,
  ``assert_invertible``), ``revtrain.lightning`` (modules, DataModules, callbacks) and
  ``revtrain.cli`` (the ``revtrain`` command).
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "Additive": ".coupling", "AdditiveCoupling": ".coupling", "Affine": ".coupling",
    "AffineCoupling": ".coupling", "ChannelSplit": ".coupling", "Coupling": ".coupling",
    "VolumePreservingAffine": ".coupling", "SigmoidAffine": ".coupling",
    "RationalQuadratic": ".splines",
    "ElementwiseTransform": ".coupling", "Split": ".coupling",
    "ChannelPermute": ".layers", "InjectivePad": ".layers", "Squeeze": ".layers",
    "SwapHalves": ".layers",
    "ConditionalNet": ".conditioning", "ConditionedStack": ".conditioning",
    "broadcast_context": ".conditioning",
    "InvertibleModule": ".base", "ReconstructionError": ".base", "is_invertible": ".base",
    "MemoryMode": ".modes", "MemoryModeMixin": ".modes", "set_memory": ".modes",
    "ReversibleSequential": ".sequential", "is_rebuilding": ".state",
    "ReversibleTransformer": ".transformer", "ReversibleTransformerBlock": ".transformer",
}
_SUBPACKAGES = ("flows", "lightning", "memory", "models", "testing")

__all__ = sorted(_EXPORTS) + list(_SUBPACKAGES)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
    elif name in _SUBPACKAGES:
        value = import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'revtrain' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

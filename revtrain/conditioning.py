r"""Conditioning: hand a context tensor to the sub-networks of a reversible stack.

``stack(x, context=c)`` calls every sub-network of every coupling as ``f(x2, c)``. A context
rarely has the shape a sub-network needs: a class embedding (``(B, K)``) for an image flow, an
image at another resolution. :func:`broadcast_context` brings it to the shape of the half it
conditions, and :class:`ConditionalNet` turns any sub-network into one that takes
``(x, context)`` by concatenating the broadcast context to its input (FrEIA's and Ardizzone et
al.'s cINN convention). :class:`ConditionedStack` computes the context with a conditioning
network, which trains through the same backward as the stack.

Example:
    >>> import torch, revtrain
    >>> from torch import nn
    >>> def net(c_in, c_out):  # takes 2 + 3 context channels
    ...     return revtrain.ConditionalNet(nn.Conv2d(c_in + 3, c_out, 3, padding=1))
    >>> stack = revtrain.ReversibleSequential(revtrain.AdditiveCoupling(net(2, 2), net(2, 2)))
    >>> x, label_embedding = torch.randn(4, 4, 8, 8), torch.randn(4, 3)
    >>> stack(x, context=label_embedding).shape
    torch.Size([4, 4, 8, 8])

Reference: Ardizzone et al., "Guided Image Generation with Conditional Invertible Neural
Networks", 2019 (cINN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["broadcast_context", "ConditionalNet", "ConditionedStack"]


def broadcast_context(context: Tensor, like: Tensor) -> Tensor:
    """``context`` shaped for concatenation with ``like`` along dimension 1.

    * ``(B, K)`` and ``like`` of shape ``(B, C, *S)``: expanded to ``(B, K, *S)`` (a view);
    * ``(B, K, *S')`` with ``S'`` other than ``S``: resized to ``S`` (bilinear for 2-D, nearest
      otherwise);
    * already ``(B, K, *S)``: returned as it is.

    Raises:
        ValueError: the batch sizes differ, or the number of dimensions cannot be matched.
    """
    if context.shape[0] != like.shape[0]:
        raise ValueError(f"broadcast_context: the context has batch size {context.shape[0]} but the "
                         f"input {like.shape[0]}; give one context row per sample")
    spatial = like.shape[2:]
    if context.dim() == 2:
        return context.view(*context.shape, *([1] * len(spatial))).expand(*context.shape, *spatial)
    if context.dim() != like.dim():
        raise ValueError(f"broadcast_context: cannot match a context of shape {tuple(context.shape)} "
                         f"to an input of shape {tuple(like.shape)}; use (B, K) or (B, K, *spatial)")
    if context.shape[2:] != spatial:
        mode = "bilinear" if len(spatial) == 2 else "nearest"
        kwargs = {"align_corners": False} if mode == "bilinear" else {}
        return F.interpolate(context, size=tuple(spatial), mode=mode, **kwargs)
    return context


class ConditionalNet(nn.Module):
    """A sub-network ``net(cat([x, broadcast_context(context, x)], dim=1))``.

    ``net`` receives the channels of ``x`` plus those of the context (for a tuple context, of
    every tensor in it). Without a context (``forward(x)``) ``net`` receives ``x`` alone, so the
    wrapped network must then be built for that width.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"ConditionalNet: net must be an nn.Module, got {type(net).__name__}")
        self.net = net

    def forward(self, x: Tensor, context=None) -> Tensor:
        if context is None:
            return self.net(x)
        parts = context if isinstance(context, (tuple, list)) else (context,)
        return self.net(torch.cat([x, *(broadcast_context(c.to(x.dtype), x) for c in parts)], dim=1))


class ConditionedStack(nn.Module):
    """``stack(x, context=conditioner(condition))``: a conditioning network and a stack.

    The conditioning network (e.g. a label embedding or a feature extractor for an observation)
    trains through the same backward pass; the context it computes is held once per call.
    ``inverse(y, condition)`` and ``forward_and_log_det(x, condition)`` condition the same way.
    """

    def __init__(self, stack: nn.Module, conditioner: nn.Module):
        super().__init__()
        self.stack, self.conditioner = stack, conditioner

    def forward(self, x: Tensor, condition: Tensor) -> Tensor:
        return self.stack(x, context=self.conditioner(condition))

    def forward_and_log_det(self, x: Tensor, condition: Tensor) -> tuple[Tensor, Tensor]:
        return self.stack.forward_and_log_det(x, context=self.conditioner(condition))

    def inverse(self, y: Tensor, condition: Tensor) -> Tensor:
        return self.stack.inverse(y, context=self.conditioner(condition))

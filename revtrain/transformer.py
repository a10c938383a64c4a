r"""Reversible transformers: a two-stream transformer coupling for ``(B, N, D)`` sequences.

The block of Rev-ViT (Mangalam et al. 2022) is an additive coupling of two streams of width
``D`` each, concatenated along the last dimension, ``x = [x_1, x_2]`` of shape ``(B, N, 2D)``:

.. math::
    y_1 = x_1 + \mathrm{Attn}(\mathrm{LN}(x_2)), \qquad
    y_2 = x_2 + \mathrm{MLP}(\mathrm{LN}(y_1))

with multi-head self-attention (:func:`torch.nn.functional.scaled_dot_product_attention`) and a
GELU MLP. It is a :class:`~revtrain.Coupling` (additive transform, split of the last
dimension), so in a :class:`~revtrain.ReversibleSequential` it is rebuilt in backward with one
extra evaluation of each sub-network; dropout and drop-path (stochastic depth) draw their random
numbers inside the sub-networks and are replayed exactly. An attention or padding mask is the
stack's ``context`` (``stack(x, context=mask)``), handed to the attention of every block.

:class:`ReversibleTransformer` is the few-line way to use it in one's own model: a
``(B, N, D)`` sequence is duplicated into the two streams, run through ``depth`` blocks and the
streams are fused at the end (their mean, their concatenation, or a linear map of it).

Reference:
    Mangalam, Fan, Li, Wu, Xiong, Feichtenhofer, Malik, "Reversible Vision Transformers",
    CVPR 2022.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .coupling import Additive, ChannelSplit, Coupling
from .engine import INVERT, RECOMPUTE, RECORD, current_recorder
from .modes import MemoryMode, MemoryModeMixin
from .sequential import ReversibleSequential

__all__ = ["ReversibleTransformerBlock", "ReversibleTransformer", "SelfAttention", "TransformerMLP",
           "drop_path", "attention_mask"]

_FUSES = ("mean", "concat", "linear")


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero the whole residual branch of a sample with probability ``p``
    (and scale the kept ones by ``1 / (1 - p)``). Identity when ``p == 0`` or not training."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)  # (B, 1, 1)
    return x * keep / (1.0 - p)


def attention_mask(mask: Tensor | None, batch: int, tokens: int, heads: int, owner: str
                   ) -> Tensor | None:
    """A mask for :func:`~torch.nn.functional.scaled_dot_product_attention`, from a context.

    Accepted: ``None``; a boolean ``(B, N)`` padding mask (``True`` = a real token, attended
    to); a boolean or additive float mask of shape ``(B, N, N)`` (query, key) or
    ``(B, heads, N, N)``. Boolean masks mark what may be attended to. Returns a 4-D mask that
    broadcasts to ``(B, heads, N, N)``.
    """
    if mask is None:
        return None
    if isinstance(mask, (tuple, list)):
        if len(mask) != 1:
            raise ValueError(f"{owner}: the context must be one attention mask, got a "
                             f"{type(mask).__name__} of {len(mask)}")
        mask = mask[0]
    if not isinstance(mask, Tensor):
        raise TypeError(f"{owner}: the context must be a mask tensor, got {type(mask).__name__}")
    shape = tuple(mask.shape)
    expected = (f"a bool padding mask (B, N) = ({batch}, {tokens}), or a bool / float attention "
                f"mask (B, N, N) = ({batch}, {tokens}, {tokens}) or (B, heads, N, N) = "
                f"({batch}, {heads}, {tokens}, {tokens})")
    if mask.dtype == torch.bool and shape == (batch, tokens):
        return mask[:, None, None, :]  # (B, 1, 1, N): keys
    if not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise ValueError(f"{owner}: the mask must be bool or float, got {mask.dtype}; "
                         f"expected {expected}")
    if shape == (batch, tokens, tokens):
        return mask[:, None]  # (B, 1, N, N)
    if shape == (batch, heads, tokens, tokens):
        return mask
    raise ValueError(f"{owner}: a mask of shape {shape} does not fit a sequence of shape "
                     f"(B, N) = ({batch}, {tokens}); expected {expected}")


class SelfAttention(nn.Module):
    r"""The stream-1 sub-network :math:`x \mapsto \mathrm{DropPath}(\mathrm{Attn}(\mathrm{LN}(x)))`.

    ``(B, N, D) -> (B, N, D)``; ``forward(x, context)`` takes the mask (see
    :func:`attention_mask`). ``attn_dropout`` is the dropout of the attention weights (inside
    ``scaled_dot_product_attention``), ``dropout`` the one after the output projection.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, dropout: float = 0.0,
                 attn_dropout: float = 0.0, drop_path: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)
        self.attn_dropout = attn_dropout
        self.drop_path = drop_path

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        h = self.num_heads
        mask = attention_mask(context, b, n, h, "ReversibleTransformerBlock")
        qkv = self.qkv(self.norm(x)).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, D / heads) each
        p = self.attn_dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        o = self.proj_drop(self.proj(o.transpose(1, 2).reshape(b, n, d)))  # (B, N, D)
        return drop_path(o, self.drop_path, self.training)


def _to(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    """``t`` as autocast hands it to a matmul: cast to ``dtype`` (``None``: no autocast)."""
    return t if t is None or dtype is None else t.to(dtype)


class _NormLinear(torch.autograd.Function):
    """``linear(layer_norm(x))`` that saves ``x`` instead of the normalized input: the LayerNorm
    is recomputed in backward (its statistics are exact: the same formula on the same ``x``).

    ``cast``: the autocast dtype of the forward (``None`` without autocast). The forward runs
    under the caller's autocast as ordinary modules would (LayerNorm in float32, the linear in
    ``cast``); backward, which autocast does not reach, repeats those casts: the matmuls in
    ``cast``, the weight and bias gradients returned in their own dtype, as autograd's cast
    nodes return them."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, weight, bias, eps, cast):
        d = x.shape[-1]
        ctx.eps, ctx.cast = eps, cast
        ctx.save_for_backward(x, norm_weight, norm_bias, weight)
        return F.linear(F.layer_norm(x, (d,), norm_weight, norm_bias, eps), weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, norm_weight, norm_bias, weight = ctx.saved_tensors
        need_x, need_nw, need_nb, need_w, need_b, _, _ = ctx.needs_input_grad
        d, cast = x.shape[-1], ctx.cast
        u, mean, rstd = torch.native_layer_norm(x, (d,), norm_weight, norm_bias, ctx.eps)
        g2 = grad.reshape(-1, grad.shape[-1])  # (M, hidden)
        grad_w = g2.t().mm(_to(u, cast).reshape(-1, d)).to(weight.dtype) if need_w else None
        del u
        grad_b = g2.sum(0).to(weight.dtype) if need_b else None
        grad_x = grad_nw = grad_nb = None
        if need_x or need_nw or need_nb:
            grad_u = grad.matmul(_to(weight, cast)).to(x.dtype)  # (..., D)
            grad_x, grad_nw, grad_nb = torch.ops.aten.native_layer_norm_backward(
                grad_u, x, (d,), mean, rstd, norm_weight, norm_bias, [need_x, need_nw, need_nb])
        return grad_x, grad_nw, grad_nb, grad_w, grad_b, None, None


class _GeluLinear(torch.autograd.Function):
    """``linear(gelu(h))`` that saves ``h`` only: ``gelu(h)`` is recomputed in backward, a block of
    rows at a time, and the gradient of ``h`` is written block by block into one buffer, so the
    backward holds ``h``, that buffer and one block instead of three ``h``-sized tensors.
    ``cast``: as for :class:`_NormLinear` (the weight gradient is summed over the blocks in the
    weight's dtype)."""

    @staticmethod
    def forward(ctx, h, weight, bias, approximate, rows, cast):
        ctx.approximate, ctx.rows, ctx.cast = approximate, rows, cast
        ctx.save_for_backward(h, weight)
        return F.linear(F.gelu(h, approximate=approximate), weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        need_h, need_w, need_b, _, _, _ = ctx.needs_input_grad
        k, cast = h.shape[-1], ctx.cast
        w = _to(weight, cast)
        h2 = h.reshape(-1, k)  # (M, hidden)
        g2 = grad.reshape(-1, grad.shape[-1])  # (M, D)
        grad_h = torch.empty_like(h2) if need_h else None
        grad_w = weight.new_zeros(weight.shape) if need_w and cast is None else None
        for start in range(0, h2.shape[0], ctx.rows):
            hc, gc = h2[start:start + ctx.rows], g2[start:start + ctx.rows]
            if need_w:
                a = F.gelu(hc, approximate=ctx.approximate)
                if cast is None:
                    grad_w.addmm_(gc.t(), a)
                else:  # the block's product in the autocast dtype, summed in the weight's
                    part = gc.t().mm(a)
                    grad_w = part.to(weight.dtype) if grad_w is None else grad_w.add_(part)
                del a
            if need_h:
                out = grad_h[start:start + ctx.rows]
                torch.mm(gc, w, out=out)
                torch.ops.aten.gelu_backward.grad_input(out, hc, approximate=ctx.approximate,
                                                        grad_input=out)
        grad_b = g2.sum(0).to(weight.dtype) if need_b else None
        return (grad_h.view(h.shape) if need_h else None), grad_w, grad_b, None, None, None


_BLOCK_ELEMENTS = 1 << 18  # rows of the hidden activation recomputed at a time: ~1 MiB in float32


def _plain_tensor(t: Tensor | None) -> bool:
    return t is None or type(t) in (Tensor, nn.Parameter)


class TransformerMLP(nn.Module):
    r"""The stream-2 sub-network :math:`x \mapsto \mathrm{DropPath}(\mathrm{MLP}(\mathrm{LN}(x)))`,
    ``D -> hidden -> D`` with GELU; ``(B, N, D) -> (B, N, D)``. Ignores the context.

    Inside a reversible stack (where everything it saves is rebuilt in backward anyway) it saves
    less than ordinary autograd: the LayerNorm's output and the GELU's output are recomputed in
    its own backward (the GELU a block of rows at a time), so the peak of its backward holds the
    hidden activation and its gradient, not three hidden-sized tensors. The gradients are those of
    the same formulas (equal to the stored twin's to rounding). Under autocast it repeats
    autocast's casts in its backward (the gradients are those of the ordinary modules under the
    same autocast, bit for bit). Anywhere else, and whenever this would hide something from the
    caller (hooks on the MLP's inner modules, hidden dropout in training, weights or stream other
    than float32 under autocast, tensor subclasses, ``torch.func`` transforms), it runs as
    ordinary modules.
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, drop_path: float = 0.0,
                 eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)
        self.drop_path = drop_path

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self._recomputes(x):
            norm, fc1, fc2 = self.norm, self.fc1, self.fc2
            device = x.device.type
            cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
            h = _NormLinear.apply(x, norm.weight, norm.bias, fc1.weight, fc1.bias, norm.eps, cast)
            rows = max(1, _BLOCK_ELEMENTS // max(h.shape[-1], 1))
            out = _GeluLinear.apply(h, fc2.weight, fc2.bias, self.act.approximate, rows, cast)
        else:
            h = self.drop(self.act(self.fc1(self.norm(x))))  # (B, N, hidden)
            out = self.fc2(h)
        return drop_path(self.drop(out), self.drop_path, self.training)

    def _recomputes(self, x: Tensor) -> bool:
        """Whether this call saves the LayerNorm's input and the hidden pre-activation only."""
        recorder = current_recorder()
        if recorder is None or recorder.call is None or recorder.mode not in _REBUILT_MODES:
            return False
        if self.training and self.drop.p > 0:
            return False
        tensors = (x, self.norm.weight, self.norm.bias, self.fc1.weight, self.fc1.bias,
                   self.fc2.weight, self.fc2.bias)
        if torch.is_autocast_enabled(x.device.type) and any(  # autocast: float32 weights and
                t is not None and t.dtype != torch.float32  # stream only (the casts it repeats)
                for t in tensors):
            return False
        if torch._C._are_functorch_transforms_active() or type(self.act) is not nn.GELU:
            return False
        parts = (self.norm, self.fc1, self.act, self.fc2, self.drop)
        if any(_hooked(m) for m in parts):
            return False
        if self.norm.weight is None or self.norm.normalized_shape != (x.shape[-1],):
            return False
        return all(_plain_tensor(t) for t in tensors)


class ReversibleTransformerBlock(Coupling):
    r"""The Rev-ViT block, a coupling of two ``D``-wide streams ``x = [x_1, x_2]``, ``(B, N, 2D)``:

    .. math::
        y_1 = x_1 + \mathrm{Attn}(\mathrm{LN}(x_2)), \qquad y_2 = x_2 + \mathrm{MLP}(\mathrm{LN}(y_1))

    Args:
        dim: the width ``D`` of one stream (the block takes ``2 * dim`` features).
        num_heads: attention heads; must divide ``dim``.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        qkv_bias: bias of the query / key / value projection.
        dropout: dropout after the attention projection and in the MLP.
        attn_dropout: dropout of the attention weights.
        drop_path: stochastic-depth probability of each of the two residual branches.
        eps: LayerNorm epsilon (1e-6 as in ViT / Rev-ViT).

    Call it as ``block(x)`` or ``block(x, mask)`` (in a stack: ``stack(x, context=mask)``), the
    mask as described in :func:`attention_mask`. Volume preserving (log-det 0).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 dropout: float = 0.0, attn_dropout: float = 0.0, drop_path: float = 0.0,
                 eps: float = 1e-6):
        _check_arguments("ReversibleTransformerBlock", dim, num_heads, mlp_ratio,
                         {"dropout": dropout, "attn_dropout": attn_dropout, "drop_path": drop_path})
        super().__init__(
            SelfAttention(dim, num_heads, qkv_bias, dropout, attn_dropout, drop_path, eps),
            TransformerMLP(dim, int(dim * mlp_ratio), dropout, drop_path, eps),
            Additive(), ChannelSplit(-1))
        self.dim, self.num_heads = dim, num_heads

    def _check(self, x: Tensor, context) -> None:
        d = self.dim
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != 2 * d:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"ReversibleTransformerBlock expects two streams of width {d} concatenated, a "
                f"sequence of shape (B, N, {2 * d}); got {got}. Duplicate a (B, N, {d}) sequence "
                f"with torch.cat([x, x], -1) (or use revtrain.ReversibleTransformer)")
        if x.shape[1] == 0:
            raise ValueError(f"ReversibleTransformerBlock: the sequence {tuple(x.shape)} has no "
                             "tokens; it needs N >= 1")
        attention_mask(context, x.shape[0], x.shape[1], self.num_heads, type(self).__name__)

    def forward_and_log_det(self, x: Tensor, context=None) -> tuple[Tensor, Tensor]:
        self._check(x, context)
        return super().forward_and_log_det(x, context)

    def inverse_steps(self, y: Tensor, context=None, *, overwrite: bool = False):
        self._check(y, context)
        return (yield from super().inverse_steps(y, context, overwrite=overwrite))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"


class ReversibleTransformer(MemoryModeMixin, nn.Module):
    r"""A reversible transformer encoder for ``(B, N, D)`` sequences, in one module.

    The sequence is duplicated into the two streams (``(B, N, 2D)``), run through ``depth``
    :class:`ReversibleTransformerBlock` in one :class:`~revtrain.ReversibleSequential`, and the
    two streams :math:`(h_1, h_2)` are fused:

    * ``fuse="mean"``: :math:`(h_1 + h_2) / 2`, ``(B, N, D)`` (default);
    * ``fuse="concat"``: :math:`[h_1, h_2]`, ``(B, N, 2D)`` (Rev-ViT: a norm and a head of width
      ``2D`` follow);
    * ``fuse="linear"``: a linear map of the concatenation to ``(B, N, D)``.

    In reversible mode a call holds only the stack's output (and the mask) between forward and
    backward, whatever ``depth``. Args as in :class:`ReversibleTransformerBlock`, plus:

    Args:
        depth: number of blocks.
        drop_path: the stochastic-depth rate of the last block, rising linearly from 0 over the
            blocks (ViT / DeiT's rule).
        fuse: ``"mean"``, ``"concat"`` or ``"linear"``.
        memory: ``"reversible"``, ``"checkpoint"`` or ``"stored"`` (the stored twin, same
            ``state_dict`` keys).

    Example:
        >>> import torch, revtrain
        >>> encoder = revtrain.ReversibleTransformer(dim=32, depth=4, num_heads=4)
        >>> x = torch.randn(2, 10, 32)                      # (B, N, D)
        >>> pad = torch.ones(2, 10, dtype=torch.bool)        # True: a real token
        >>> encoder(x, mask=pad).shape
        torch.Size([2, 10, 32])
    """

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, dropout: float = 0.0, attn_dropout: float = 0.0,
                 drop_path: float = 0.0, fuse: str = "mean", memory: MemoryMode | str = "reversible",
                 eps: float = 1e-6):
        super().__init__()
        memory = MemoryMode.parse(memory)
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"ReversibleTransformer: depth must be a positive int, got {depth!r}")
        if fuse not in _FUSES:
            raise ValueError(f"ReversibleTransformer: fuse must be one of {_FUSES}, got {fuse!r}")
        _check_arguments("ReversibleTransformer", dim, num_heads, mlp_ratio,
                         {"dropout": dropout, "attn_dropout": attn_dropout, "drop_path": drop_path})
        self.dim, self.depth, self.fuse = dim, depth, fuse
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # 0 .. drop_path
        self.blocks = ReversibleSequential(
            *[ReversibleTransformerBlock(dim, num_heads, mlp_ratio, qkv_bias, dropout, attn_dropout,
                                         rate, eps) for rate in rates], memory=memory)
        self.proj = nn.Linear(2 * dim, dim) if fuse == "linear" else None
        self.memory = memory

    @property
    def out_dim(self) -> int:
        """Width of the output tokens: ``2 * dim`` for ``fuse="concat"``, else ``dim``."""
        return 2 * self.dim if self.fuse == "concat" else self.dim

    def streams(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The two streams after the last block, ``(B, N, 2D)``, before the fusion."""
        d = self.dim
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != d:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"ReversibleTransformer expects a sequence of shape (B, N, {d}); "
                             f"got {got}")
        h = torch.cat([x, x], dim=-1)  # (B, N, 2D): the input duplicated into both streams
        return self.blocks(h, context=mask)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.streams(x, mask)  # (B, N, 2D)
        if self.fuse == "concat":
            return h
        if self.fuse == "linear":
            return self.proj(h)  # (B, N, D)
        h1, h2 = h.chunk(2, dim=-1)
        return (h1 + h2) * 0.5  # (B, N, D)


_REBUILT_MODES = (RECORD, RECOMPUTE, INVERT)


def _hooked(m: nn.Module) -> bool:
    """Whether a forward or backward hook (of ``m`` or global) would see ``m``'s call."""
    from torch.nn.modules import module as _m
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks or _m._global_forward_hooks
                or _m._global_forward_pre_hooks or _m._global_backward_hooks
                or _m._global_backward_pre_hooks)


def _check_arguments(owner: str, dim: int, num_heads: int, mlp_ratio: float,
                     rates: dict[str, float]) -> None:
    if not isinstance(dim, int) or dim < 1 or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"{owner}: dim and num_heads must be positive ints, got {dim!r} and "
                         f"{num_heads!r}")
    if dim % num_heads:
        raise ValueError(f"{owner}: num_heads={num_heads} must divide the stream width "
                         f"dim={dim} (each head takes dim / num_heads features)")
    if not mlp_ratio > 0 or int(dim * mlp_ratio) < 1:
        raise ValueError(f"{owner}: mlp_ratio must give a hidden width of at least 1, got "
                         f"{mlp_ratio!r}")
    for name, p in rates.items():
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{owner}: {name} must lie in [0, 1), got {p!r}")

r"""Reversible Vision Transformers (Rev-ViT, Mangalam et al. 2022).

A Rev-ViT is a ViT whose encoder is one :class:`~revtrain.ReversibleSequential` of
:class:`~revtrain.ReversibleTransformerBlock`: the patch tokens (plus an optional class token
and a learned position embedding) are duplicated into two streams of width ``D``,

.. math::
    y_1 = x_1 + \mathrm{Attn}(\mathrm{LN}(x_2)), \qquad y_2 = x_2 + \mathrm{MLP}(\mathrm{LN}(y_1))

and the two streams are concatenated at the end (``2D`` features, as in the paper's
``RESPATH_FUSE: concat``), pooled (mean over the tokens, the paper's ImageNet setting, or the
class token), normalised and classified. In reversible mode a training step holds the encoder's
output only, whatever the depth. ``memory="stored"`` is the stored twin, same ``state_dict``.

Differences from the reference code (SlowFast): one fused query / key / value projection
(the same parameters as SlowFast's separate ones), and the final LayerNorm after pooling
instead of before it (the same for the class token; for mean pooling it keeps the ``(B, N, 2D)``
normalised sequence out of the held memory).

Reference:
    Mangalam, Fan, Li, Wu, Xiong, Feichtenhofer, Malik, "Reversible Vision Transformers",
    CVPR 2022 (Table 1; SlowFast's configs/ImageNet/REV_VIT_{S,B}.yaml).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from revtrain import MemoryMode, ReversibleSequential, ReversibleTransformerBlock
from revtrain.modes import MemoryModeMixin

from ._blocks import check_input
from ._registry import register_model

__all__ = ["RevViT", "rev_vit_tiny", "rev_vit_small", "rev_vit_base", "rev_vit_large",
           "rev_vit_digits"]

_POOLS = ("mean", "cls")
_POS_EMBEDS = ("learned", "sincos")


def sincos_2d(side: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings of a ``side x side`` grid, ``(side**2, dim)``:
    a quarter of the features each for sin / cos of the row and of the column (MAE)."""
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64),
                                torch.arange(side, dtype=torch.float64), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    r = rows.reshape(-1, 1) * omega  # (N, D / 4)
    c = cols.reshape(-1, 1) * omega
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1).float()  # (N, D)


class RevViT(MemoryModeMixin, nn.Module):
    """A reversible Vision Transformer classifier.

    Args:
        img_size: height and width of the input images (the position embedding is learned for
            this size).
        patch_size: side of the square patches (the stride of the patch embedding); must
            divide ``img_size``.
        patch_kernel: side of the patch embedding's kernel; default ``patch_size``
            (non-overlapping patches, ViT). A larger one gives overlapping patches (SlowFast's
            ``PATCH_KERNEL`` / ``PATCH_STRIDE`` / ``PATCH_PADDING``), padded by
            ``(patch_kernel - patch_size + 1) // 2`` so that the tokens stay
            ``(img_size / patch_size)**2``.
        in_channels: channels of the input image.
        num_classes: outputs of the linear head.
        embed_dim: width ``D`` of each of the two streams (the ViT width).
        depth: number of reversible blocks (each: attention and MLP).
        num_heads: attention heads; must divide ``embed_dim``.
        mlp_ratio: MLP hidden width as a multiple of ``embed_dim``.
        qkv_bias: bias of the query / key / value projection.
        pool: ``"mean"`` (mean of the patch tokens; Rev-ViT's ImageNet configs) or ``"cls"``
            (a class token).
        pos_embed: ``"learned"`` (ViT, Rev-ViT) or ``"sincos"``: fixed 2-D sine-cosine
            position embeddings (MAE; Beyer et al. 2022, "Better plain ViT baselines"), a
            non-persistent buffer; the class token gets zeros.
        dropout: dropout after the attention projection, in the MLP and on the embedded tokens.
        attn_dropout: dropout of the attention weights.
        drop_path: stochastic depth of the last block, rising linearly from 0 (DeiT's rule).
        memory: ``"reversible"``, ``"checkpoint"`` or ``"stored"`` (the twin).

    Input ``(B, in_channels, img_size, img_size)``; output ``(B, num_classes)``.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        num_classes: int = 1000,
        patch_kernel: int | None = None,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        pool: str = "mean",
        pos_embed: str = "learned",
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        memory: MemoryMode | str = "reversible",
    ):
        super().__init__()
        memory = MemoryMode.parse(memory)  # a bad mode fails before a large model is built
        if patch_size < 1 or img_size < 1 or img_size % patch_size:
            raise ValueError(f"RevViT: img_size={img_size} must be a positive multiple of "
                             f"patch_size={patch_size}; e.g. img_size="
                             f"{max(1, round(img_size / max(patch_size, 1))) * patch_size}")
        if pool not in _POOLS:
            raise ValueError(f"RevViT: pool must be one of {_POOLS}, got {pool!r}")
        if pos_embed not in _POS_EMBEDS:
            raise ValueError(f"RevViT: pos_embed must be one of {_POS_EMBEDS}, got {pos_embed!r}")
        if pos_embed == "sincos" and embed_dim % 4:
            raise ValueError(f"RevViT: pos_embed='sincos' needs embed_dim divisible by 4, got "
                             f"{embed_dim}")
        if in_channels < 1 or num_classes < 1 or depth < 1:
            raise ValueError(f"RevViT: in_channels, num_classes and depth must be positive, got "
                             f"{in_channels}, {num_classes} and {depth}")
        self.img_size, self.patch_size = img_size, patch_size
        self.in_channels, self.num_classes = in_channels, num_classes
        self.input_multiple = patch_size
        self.input_shape = (in_channels, img_size, img_size)
        self.embed_dim, self.pool = embed_dim, pool
        num_patches = (img_size // patch_size) ** 2
        kernel = patch_size if patch_kernel is None else patch_kernel
        if kernel < patch_size:
            raise ValueError(f"RevViT: patch_kernel={kernel} must be at least patch_size="
                             f"{patch_size}")
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, kernel, patch_size,
                                     padding=(kernel - patch_size + 1) // 2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if pool == "cls" else None
        positions = (1, num_patches + (pool == "cls"), embed_dim)
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(positions))
        else:
            table = sincos_2d(img_size // patch_size, embed_dim)  # (N, D)
            if pool == "cls":
                table = torch.cat([table.new_zeros(1, embed_dim), table])
            self.register_buffer("pos_embed", table[None].to(torch.get_default_dtype()),
                                 persistent=False)
        self.pos_drop = nn.Dropout(dropout)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # 0 .. drop_path
        self.blocks = ReversibleSequential(
            *[ReversibleTransformerBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, dropout,
                                         attn_dropout, rate) for rate in rates], memory=memory)
        self.norm = nn.LayerNorm(2 * embed_dim, eps=1e-6)
        self.head = nn.Linear(2 * embed_dim, num_classes)
        self._init_weights()
        self.memory = memory

    def _init_weights(self) -> None:
        # ViT / SlowFast: truncated normal 0.02 for linear weights and embeddings
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def tokens(self, x: Tensor) -> Tensor:
        """The embedded tokens ``(B, N, D)``: patches (and the class token) plus positions."""
        name = type(self).__name__
        check_input(x, name, self.in_channels, self.patch_size)
        if tuple(x.shape[2:]) != (self.img_size, self.img_size):
            raise ValueError(
                f"{name} expects images of shape (B, {self.in_channels}, {self.img_size}, "
                f"{self.img_size}) (img_size={self.img_size}, the size its position embedding "
                f"was made for); got {tuple(x.shape)}. Build it with img_size={x.shape[2]} "
                "for square images of that size, or resize the images")
        t = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        if self.cls_token is not None:
            t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)  # (B, 1 + N, D)
        return self.pos_drop(t + self.pos_embed)

    def features(self, x: Tensor) -> Tensor:
        """The two streams after the last block, concatenated: ``(B, N, 2D)``."""
        t = self.tokens(x)
        return self.blocks(torch.cat([t, t], dim=-1))  # both streams start as the tokens

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)  # (B, N, 2D)
        pooled = h[:, 0] if self.pool == "cls" else h.mean(dim=1)  # (B, 2D)
        return self.head(self.norm(pooled))  # (B, num_classes)


# --- registered models: the ViT sizes, Rev-ViT paper -------------------------------------------
# Each entry point fixes the width / depth / heads of its row and passes every other keyword
# (img_size, patch_size, num_classes, in_channels, memory, drop_path, pool, ...) on to RevViT.

_IMAGENET = (3, 224, 224)
_PAPER = "Rev-ViT (Mangalam et al. 2022), Table 1"


def _vit(embed_dim: int, depth: int, num_heads: int, img_size: int, patch_size: int,
         num_classes: int, in_channels: int, kwargs: dict) -> RevViT:
    return RevViT(**{"img_size": img_size, "patch_size": patch_size, "num_classes": num_classes,
                     "in_channels": in_channels, "embed_dim": embed_dim, "depth": depth,
                     "num_heads": num_heads, **kwargs})


@register_model(input_size=_IMAGENET, paper="ViT-Ti width (DeiT); not in the Rev-ViT paper")
def rev_vit_tiny(img_size: int = 224, patch_size: int = 16, num_classes: int = 1000,
                 in_channels: int = 3, **kwargs) -> RevViT:
    """Rev-ViT-Ti: width 192, 12 blocks, 3 heads, patch 16."""
    return _vit(192, 12, 3, img_size, patch_size, num_classes, in_channels, kwargs)


@register_model(input_size=_IMAGENET, paper_params=22e6, paper=_PAPER)
def rev_vit_small(img_size: int = 224, patch_size: int = 16, num_classes: int = 1000,
                  in_channels: int = 3, **kwargs) -> RevViT:
    """Rev-ViT-S: width 384, 12 blocks, 6 heads, patch 16."""
    return _vit(384, 12, 6, img_size, patch_size, num_classes, in_channels, kwargs)


@register_model(input_size=_IMAGENET, paper_params=87e6, paper=_PAPER)
def rev_vit_base(img_size: int = 224, patch_size: int = 16, num_classes: int = 1000,
                 in_channels: int = 3, **kwargs) -> RevViT:
    """Rev-ViT-B: width 768, 12 blocks, 12 heads, patch 16."""
    return _vit(768, 12, 12, img_size, patch_size, num_classes, in_channels, kwargs)


@register_model(input_size=_IMAGENET, paper="ViT-L width (Dosovitskiy et al.); not in the "
                "Rev-ViT paper's ImageNet table")
def rev_vit_large(img_size: int = 224, patch_size: int = 16, num_classes: int = 1000,
                  in_channels: int = 3, **kwargs) -> RevViT:
    """Rev-ViT-L: width 1024, 24 blocks, 16 heads, patch 16."""
    return _vit(1024, 24, 16, img_size, patch_size, num_classes, in_channels, kwargs)


@register_model(input_size=(1, 8, 8))
def rev_vit_digits(img_size: int = 8, patch_size: int = 2, num_classes: int = 10,
                   in_channels: int = 1, **kwargs) -> RevViT:
    """A small Rev-ViT for scikit-learn's 8x8 grey digits: patch 2, width 64, 4 blocks, 4 heads,
    MLP ratio 2, mean pooling."""
    return _vit(64, 4, 4, img_size, patch_size, num_classes, in_channels,
                {"mlp_ratio": 2.0, **kwargs})

r"""Mixup / CutMix of training batches with torchvision's ``transforms.v2``.

Mixup (Zhang et al., 2018) replaces a batch by convex combinations of pairs of its images and
of their one-hot labels, :math:`\tilde x = \lambda x_i + (1 - \lambda) x_j`,
:math:`\tilde y = \lambda y_i + (1 - \lambda) y_j`, :math:`\lambda \sim \mathrm{Beta}(\alpha,
\alpha)`; CutMix (Yun et al., 2019) pastes a box of :math:`x_j` into :math:`x_i` instead and
weights the labels by the areas. DeiT (Touvron et al., 2021), whose recipe the Rev-ViT paper
trains with, applies one of the two to every batch: mixup with :math:`\alpha = 0.8`, CutMix with
:math:`\alpha = 1.0`, each chosen with probability 0.5.

The pairing is torchvision's: sample ``i`` with sample ``i - 1`` of the batch (``roll(1, 0)``),
one :math:`\lambda` per batch. The batch must therefore come shuffled, as a training loader's
does.
"""

from __future__ import annotations

import torch

__all__ = ["BatchMix"]


class BatchMix:
    r"""Mixup and / or CutMix of a batch ``(x, y)`` of images and integer labels.

    Returns the mixed images and the mixed targets, a ``(B, num_classes)`` float tensor whose
    rows sum to 1, or the batch unchanged (integer labels) when it is not mixed. Label
    smoothing is the loss's (``F.cross_entropy(logits, target, label_smoothing=eps)``
    smooths a soft target as :math:`(1 - \epsilon)\,\tilde y + \epsilon / C`, which is the
    mixture of the smoothed one-hot labels, as timm's ``Mixup`` builds it).

    Args:
        num_classes: number of labels (the width of the soft targets).
        mixup_alpha: :math:`\alpha` of mixup's Beta distribution; 0 turns mixup off.
        cutmix_alpha: :math:`\alpha` of CutMix's Beta distribution; 0 turns CutMix off.
        mix_prob: probability that a batch is mixed at all (DeiT: 1.0).
        switch_prob: with both on, probability that a batch gets CutMix rather than mixup
            (DeiT: 0.5).
        name: how errors name the options (``"--model."`` for the ``revtrain`` command).

    Raises:
        ValueError: a negative :math:`\alpha`, a probability outside ``[0, 1]``, or fewer than
            two classes with mixing on; the message names the option.

    >>> mix = BatchMix(10, mixup_alpha=0.8, cutmix_alpha=1.0)
    >>> x, y = mix(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    >>> y.shape, bool(torch.allclose(y.sum(-1), torch.ones(4)))
    (torch.Size([4, 10]), True)
    >>> BatchMix(10).enabled
    False
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 mix_prob: float = 1.0, switch_prob: float = 0.5, name: str = ""):
        for option, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if not alpha >= 0.0:  # also refuses NaN
                raise ValueError(f"{name}{option} must be >= 0 (0 turns it off; DeiT: mixup 0.8, "
                                 f"cutmix 1.0), got {alpha}")
        for option, p in (("mix_prob", mix_prob), ("switch_prob", switch_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}{option} is a probability and must be in [0, 1], got {p}")
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.mix_prob, self.switch_prob = float(mix_prob), float(switch_prob)
        self.transform = self._build()
        if self.transform is not None and num_classes < 2:
            raise ValueError(f"{name}mixup_alpha / {name}cutmix_alpha: mixing needs at least 2 "
                             f"classes, got num_classes={num_classes}")

    def _build(self):
        from torchvision.transforms import v2

        parts = []
        if self.mixup_alpha > 0:
            parts.append((v2.MixUp(alpha=self.mixup_alpha, num_classes=self.num_classes),
                          1.0 - self.switch_prob))
        if self.cutmix_alpha > 0:
            parts.append((v2.CutMix(alpha=self.cutmix_alpha, num_classes=self.num_classes),
                          self.switch_prob))
        if not parts or self.mix_prob == 0:
            return None
        if len(parts) == 1:
            transform = parts[0][0]
        elif self.switch_prob in (0.0, 1.0):  # RandomChoice would still draw a number
            transform = parts[int(self.switch_prob)][0]
        else:
            transform = v2.RandomChoice([t for t, _ in parts], p=[p for _, p in parts])
        return transform if self.mix_prob == 1 else v2.RandomApply([transform], p=self.mix_prob)

    @property
    def enabled(self) -> bool:
        """Whether any batch can be mixed (an alpha above 0 and ``mix_prob`` above 0)."""
        return self.transform is not None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.transform is None:
            return x, y  # nothing drawn from the RNG: training is that of no mixing at all
        if y.ndim != 1 or y.is_floating_point():
            raise ValueError(f"BatchMix expects integer labels of shape (B,), got a {y.dtype} "
                             f"tensor of shape {tuple(y.shape)}")
        x, y = self.transform(x, y)  # (B, C, H, W), (B, num_classes) float or (B,) long
        return x, y

    def __repr__(self) -> str:
        return (f"BatchMix(num_classes={self.num_classes}, mixup_alpha={self.mixup_alpha}, "
                f"cutmix_alpha={self.cutmix_alpha}, mix_prob={self.mix_prob}, "
                f"switch_prob={self.switch_prob})")

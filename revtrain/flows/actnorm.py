r"""ActNorm: a per-channel affine layer with data-dependent initialisation (Glow).

.. math::
    y_{c} = x_{c}\, e^{s_c} + b_c, \qquad
    \log|\det J| = S \sum_c s_c

with :math:`S` the number of positions per channel (:math:`H W` for images, 1 for vectors).

On the first forward pass in training mode, :math:`s` and :math:`b` are set so that the
output of that batch has zero mean and unit variance per channel; afterwards they are
ordinary parameters. The ``initialized`` buffer records that this happened, so it is saved in
``state_dict`` and a resumed run does not initialise again. Under ``torch.distributed`` the
statistics are averaged over all ranks, so every replica starts with the same parameters.

Reference: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..base import InvertibleModule

__all__ = ["ActNorm"]


class ActNorm(InvertibleModule):
    r"""Per-channel :math:`y = x e^{s} + b` with data-dependent initialisation.

    Args:
        num_features: number of channels ``C`` (dimension 1); inputs are ``(B, C)`` or
            ``(B, C, ...)``.
        eps: added to the standard deviation at initialisation.

    Attributes:
        log_scale: :math:`s`, shape ``(C,)``.
        bias: :math:`b`, shape ``(C,)``.
        initialized: a 0-dim bool buffer; ``True`` once the data-dependent initialisation ran
            (or after loading a ``state_dict`` in which it had).
    """

    def __init__(self, num_features: int, eps: float = 1e-6):
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"ActNorm: num_features must be a positive int, got {num_features!r}")
        self.num_features = num_features
        self.eps = eps
        self.log_scale = nn.Parameter(torch.zeros(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("initialized", torch.tensor(False))

    def _check(self, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"ActNorm: expects {self.num_features} channels in dimension 1, got "
                             f"an input of shape {tuple(x.shape)}")

    def _view(self, v: Tensor, x: Tensor) -> Tensor:
        return v.view(1, -1, *([1] * (x.dim() - 2)))  # (1, C, 1, ...)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set :math:`s, b` so that ``x`` maps to zero mean, unit variance per channel.

        Statistics are taken over the batch and all positions; under an initialised
        ``torch.distributed`` process group they are averaged over the ranks first.
        """
        xt = x.detach().transpose(0, 1).reshape(self.num_features, -1)  # (C, N)
        stats = torch.stack([xt.sum(1), xt.square().sum(1),
                             torch.full_like(xt[:, 0], xt.shape[1])])  # (3, C)
        stats = stats.double()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        mean = stats[0] / stats[2]
        var = (stats[1] / stats[2] - mean.square()).clamp_min(0)
        log_scale = -torch.log(var.sqrt() + self.eps)
        self.log_scale.data.copy_(log_scale)
        self.bias.data.copy_(-mean * torch.exp(log_scale))
        self.initialized.fill_(True)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        if self.training and not bool(self.initialized):
            self.initialize(x)
        positions = x[0, 0].numel()
        y = x * torch.exp(self._view(self.log_scale, x)) + self._view(self.bias, x)
        log_det = (positions * self.log_scale.sum()).expand(x.shape[0])
        return y, log_det

    def inverse(self, y: Tensor) -> Tensor:
        self._check(y)
        return (y - self._view(self.bias, y)) * torch.exp(-self._view(self.log_scale, y))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "initialized"
        if key not in state_dict and prefix + "log_scale" in state_dict:
            # a checkpoint written before the buffer existed holds trained parameters
            state_dict[key] = torch.tensor(True)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, initialized={bool(self.initialized)}"

r"""Conditional invertible networks: a vector cINN, class-conditional RealNVP / Glow, an i-RIM toy.

A conditional flow models :math:`p(x \mid c)` with a bijection :math:`z = T(x; c)` whose
sub-networks all receive a context computed from the condition :math:`c` by a conditioning
network :math:`h = H(c)`:

.. math::
    \log p(x \mid c) = \log \mathcal N(z; 0, I)
        + \log\left|\det \frac{\partial T(x; H(c))}{\partial x}\right|.

* :func:`cinn`: vectors. Conditional affine couplings (both halves transformed, as in
  Ardizzone et al.'s cINN and FrEIA's ``GLOWCouplingBlock``) with a fixed random permutation
  after each; the observation :math:`y` goes through a small MLP (the conditioning network)
  whose output is concatenated to the input of every sub-network. Posterior estimation
  :math:`p(x \mid y)`: train by maximum likelihood on pairs ``(x, y)``, sample ``x`` for an
  observation with ``sample(n, context=y)``.
* :func:`cond_realnvp`, :func:`cond_glow`: images given a class label. The label embedding
  (the conditioning network) is broadcast over the image and concatenated to the input of every
  coupling network, of every split prior (Glow's class-conditional split prior, Kingma &
  Dhariwal 2018, appendix) and parameterises a learned class-conditional Gaussian of the top
  latent.
* :func:`irim_toy`: an i-RIM-style reversible recurrent refinement of a signal given a linear
  measurement (Putzky & Welling 2019): the back-projected measurement :math:`A^\top y` is the
  context, each iteration computes the data-term gradient :math:`A^\top A \hat x - A^\top y`
  from it.

Every model keeps its couplings in :class:`revtrain.ReversibleSequential` stacks, so with
``memory="reversible"`` (default) a call keeps only each stack's output and the context (held
once per call): activation memory does not grow with depth, and the gradients of the
parameters, of ``x`` and of the condition equal the stored twin's (``memory="stored"``).

At model level ``context`` is the *condition* (labels, observations); the model computes the
sub-networks' context from it. Calling a conditional model without it raises a ``ValueError``
that names the model and the expected shape.

References:
    Ardizzone et al., "Guided Image Generation with Conditional Invertible Neural Networks", 2019.
    Kruse et al., "Benchmarking Invertible Architectures on Inverse Problems", 2021.
    Kingma & Dhariwal, "Glow", 2018 (appendix: class-conditional prior).
    Putzky & Welling, "Invert to Learn to Invert" (i-RIM), 2019.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from revtrain import (
    Additive,
    AdditiveCoupling,
    Affine,
    AffineCoupling,
    ChannelPermute,
    ConditionalNet,
    Coupling,
    MemoryMode,
    ReversibleSequential,
    broadcast_context,
)
from revtrain.base import InvertibleModule
from revtrain.flows import (
    MLP,
    ActNorm,
    CenterShift,
    ChannelMask,
    CheckerboardMask,
    CheckerboardNet,
    ClassConditionalGaussian,
    ConvNet,
    InvConv1x1,
    InvConv1x1LU,
    LogitTransform,
    StandardNormal,
    check_labels,
    expand_labels,
    split_sizes,
)
from revtrain.layers import Squeeze
from revtrain.modes import MemoryModeMixin

from ._registry import register_model, variant_of
from .flows import gin

__all__ = [
    "ClassLabels", "LabelEmbedding", "ObservationNet", "ConditionalFlow", "ConditionalVectorFlow",
    "MixturePriorFlow", "ConditionalMultiScaleFlow", "ConditionalCheckerboardNet", "ConditionalGaussianSplit",
    "ConditionalNormal", "IterativeRefinement",
    "cinn", "cinn_ik", "cond_realnvp", "cond_realnvp_digits", "cond_glow", "cond_glow_digits",
    "cond_gin", "cond_gin_digits", "irim_toy",
]


# --------------------------------------------------------------------------- conditioning networks


class ClassLabels(nn.Module):
    """Class labels ``(B,)`` (integers in ``0..num_classes-1``), checked and passed on as they are.

    The conditioner of a model whose prior takes the labels themselves (:func:`cond_gin`);
    :class:`LabelEmbedding` adds an embedding.
    """

    def __init__(self, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"{type(self).__name__}: needs num_classes >= 2, got {num_classes}")
        self.num_classes = num_classes

    def _device(self) -> torch.device | None:
        return None

    def describe(self) -> str:
        return f"class labels of shape (B,) with values in 0..{self.num_classes - 1}"

    def example(self, batch: int) -> Tensor:
        """A valid condition for ``batch`` samples (labels ``0, 1, ..., K-1, 0, ...``)."""
        return torch.arange(batch, device=self._device()) % self.num_classes

    def check(self, labels, owner: str) -> Tensor:
        return check_labels(labels, self.num_classes, owner)

    def expand(self, labels, n: int, owner: str) -> Tensor:
        """``n`` labels from one label (int or 0-d / 1-element tensor) or from ``n`` labels."""
        return expand_labels(labels, n, self.num_classes, owner, self._device())

    def forward(self, labels: Tensor) -> Tensor:
        return self.check(labels, type(self).__name__)  # (B,)


class LabelEmbedding(ClassLabels):
    """Class labels ``(B,)`` (integers in ``0..num_classes-1``) to a context ``(B, dim)``."""

    def __init__(self, num_classes: int, dim: int):
        if num_classes < 2 or dim < 1:
            raise ValueError(f"LabelEmbedding: needs num_classes >= 2 and dim >= 1, got "
                             f"{num_classes}, {dim}")
        super().__init__(num_classes)
        self.dim = dim
        self.embedding = nn.Embedding(num_classes, dim)

    def _device(self) -> torch.device:
        return self.embedding.weight.device

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding(self.check(labels, type(self).__name__))  # (B, dim)


class ObservationNet(nn.Module):
    """Observations ``(B, cond_dim)`` to a context ``(B, features)``: an MLP, or the identity.

    Args:
        cond_dim: size of one observation.
        features: size of the context (ignored when ``hidden == 0``: the identity, ``cond_dim``).
        hidden: width of the hidden layers; ``0`` for no network.
        depth: number of hidden layers.
    """

    def __init__(self, cond_dim: int, features: int = 16, hidden: int = 64, depth: int = 1):
        super().__init__()
        if cond_dim < 1:
            raise ValueError(f"ObservationNet: cond_dim must be positive, got {cond_dim}")
        self.cond_dim = cond_dim
        if hidden:
            layers: list[nn.Module] = []
            width = cond_dim
            for _ in range(depth):
                layers += [nn.Linear(width, hidden), nn.ReLU()]
                width = hidden
            self.net: nn.Module = nn.Sequential(*layers, nn.Linear(width, features))
            self.features = features
        else:
            self.net = nn.Identity()
            self.features = cond_dim

    def describe(self) -> str:
        return f"observations of shape (B, {self.cond_dim})"

    def example(self, batch: int) -> Tensor:
        """A valid condition for ``batch`` samples (zeros)."""
        ref = next(self.parameters(), None)
        return torch.zeros(batch, self.cond_dim, device=None if ref is None else ref.device,
                           dtype=torch.float32 if ref is None else ref.dtype)

    def check(self, y, owner: str) -> Tensor:
        if not isinstance(y, Tensor):
            raise TypeError(f"{owner}: the condition must be a tensor of {self.describe()}, got "
                            f"{type(y).__name__}")
        if y.dim() != 2 or y.shape[1] != self.cond_dim or not y.is_floating_point():
            raise ValueError(f"{owner}: expects {self.describe()} (floating point), got a {y.dtype} "
                             f"tensor of shape {tuple(y.shape)}")
        return y

    def expand(self, y, n: int, owner: str) -> Tensor:
        """``n`` observations from one (``(cond_dim,)`` or ``(1, cond_dim)``) or from ``n``."""
        if isinstance(y, Tensor) and y.dim() == 1:
            y = y.unsqueeze(0)
        if isinstance(y, Tensor) and y.dim() == 2 and y.shape[0] == 1 and n != 1:
            y = y.expand(n, -1)
        return self.check(y, owner)

    def forward(self, y: Tensor) -> Tensor:
        return self.net(self.check(y, type(self).__name__))  # (B, features)


# --------------------------------------------------------------------------- layers


class ConditionalCheckerboardNet(CheckerboardNet):
    """:class:`~revtrain.flows.CheckerboardNet` whose network also sees a context.

    ``net`` maps ``(B, C + 1 + K, H, W)`` (the unpacked half, the mask channel and the context
    broadcast over the grid) to ``(B, K_out, H, W)``; the output is packed as in the parent.
    """

    def forward(self, x2: Tensor, context=None) -> Tensor:
        full = self.mask.unpack(x2, 2)  # (B, C, H, W)
        known = self.mask.unpack(torch.ones_like(x2[:, :1]), 2)  # (B, 1, H, W)
        parts = [full, known]
        if context is not None:
            contexts = context if isinstance(context, (tuple, list)) else (context,)
            parts += [broadcast_context(c.to(full.dtype), full) for c in contexts]
        h = self.net(torch.cat(parts, dim=1))  # (B, K_out, H, W)
        return self.mask.pack(h, 1)  # (B, K_out, H, W/2)


class ConditionalGaussianSplit(Coupling):
    r"""Glow's split prior conditioned on the context: :math:`z_2 \mid z_1, c`.

    Like :class:`~revtrain.flows.GaussianSplit` (``cat(z1, eps)`` with
    :math:`\epsilon = z_2 e^{s(z_1, c)} + t(z_1, c)`), but the prior network (a zero-initialised
    3x3 convolution, or a small ConvNet with ``hidden``) takes ``cat(z1, context)``.

    Args:
        num_channels: ``C`` (at least 2).
        context_channels: ``K``, channels of the (broadcast) context.
        hidden: ``0`` for Glow's single zero convolution.
        clamp: soft bound of :math:`|s|`.
    """

    def __init__(self, num_channels: int, context_channels: int, hidden: int = 0,
                 clamp: float | None = 4.0):
        if num_channels < 2:
            raise ValueError(f"ConditionalGaussianSplit: needs at least 2 channels, got {num_channels}")
        kept, factored = split_sizes(num_channels)
        width = kept + context_channels
        net = ConvNet(width, 2 * factored, hidden) if hidden else ConvNet.zero_conv(width, 2 * factored)
        super().__init__(ConditionalNet(net), None, Affine(clamp), ChannelMask(flip=True))
        self.num_channels = num_channels

    def factor(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(z1, eps)`` of an output ``y``."""
        kept, _ = split_sizes(y.shape[1])
        return y[:, :kept], y[:, kept:]


class ConditionalNormal(nn.Module):
    r"""A class-conditional Gaussian of the top latent: :math:`h \sim \mathcal N(\mu(c), e^{2\sigma(c)})`.

    Per channel, shared over positions; a zero-initialised linear map of the context gives
    :math:`(\mu, \sigma)`, so it starts as the standard normal. :meth:`standardize` maps
    :math:`h` to :math:`\epsilon = (h - \mu) e^{-\sigma}` with log-det :math:`-\sum \sigma`.
    """

    def __init__(self, num_channels: int, context_dim: int):
        super().__init__()
        self.net = nn.Linear(context_dim, 2 * num_channels)
        nn.init.zeros_(self.net.weight)
        nn.init.zeros_(self.net.bias)

    def _params(self, h: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        mu, log_sigma = self.net(context.to(h.dtype)).chunk(2, dim=1)  # (B, C) each
        shape = (h.shape[0], h.shape[1], *([1] * (h.dim() - 2)))
        return mu.reshape(shape), log_sigma.reshape(shape)

    def standardize(self, h: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        mu, log_sigma = self._params(h, context)
        positions = h[0, 0].numel()
        return (h - mu) * torch.exp(-log_sigma), -positions * log_sigma.flatten(1).sum(1)

    def unstandardize(self, eps: Tensor, context: Tensor) -> Tensor:
        mu, log_sigma = self._params(eps, context)
        return eps * torch.exp(log_sigma) + mu


# --------------------------------------------------------------------------- models


class ConditionalFlow(MemoryModeMixin, InvertibleModule):
    r"""Common part of the conditional flows: the condition check, ``log_prob``, ``sample``, ``memory``.

    Subclasses provide ``conditioner`` (a :class:`LabelEmbedding` or :class:`ObservationNet`),
    ``num_dims`` and ``latent_shape`` and implement ``forward_and_log_det(x, context)`` /
    ``inverse(z, context)`` with ``context`` the condition.
    """

    conditioner: nn.Module
    num_dims: int

    def __init__(self):
        super().__init__()
        self.prior = StandardNormal()

    def example_context(self, batch: int) -> Tensor:
        """A valid condition for ``batch`` samples (for planners and smoke tests)."""
        return self.conditioner.example(batch)

    def context_of(self, condition, batch: int, owner: str) -> Tensor:
        """The sub-networks' context ``conditioner(condition)`` for a batch of ``batch`` samples.

        Raises:
            ValueError: no condition, a condition of the wrong shape, or another batch size.
        """
        name = f"{type(self).__name__}.{owner}"
        if condition is None:
            raise ValueError(
                f"{name}: this model is conditional; pass context= with {self.conditioner.describe()}, "
                f"one per sample (here B = {batch})")
        self.conditioner.check(condition, name)
        if condition.shape[0] != batch:
            raise ValueError(f"{name}: the condition has batch size {condition.shape[0]} but the input "
                             f"{batch}; give one condition per sample ({self.conditioner.describe()})")
        return self.conditioner(condition)

    def log_prob(self, x: Tensor, context=None) -> Tensor:
        r""":math:`\log p(x \mid c)` per sample, shape ``(batch,)``, in nats; ``context`` is :math:`c`."""
        z, log_det = self.forward_and_log_det(x, context)
        return self.prior.log_prob(z) + log_det

    @torch.no_grad()
    def sample(self, n: int, context=None, temperature: float = 1.0) -> Tensor:
        """``n`` samples given ``context``: one condition (used for all ``n``) or ``n`` of them.

        The latent is drawn at ``temperature`` (1: the model's density).
        """
        if context is None:
            raise ValueError(f"{type(self).__name__}.sample: this model is conditional; pass context= "
                             f"with one condition or n = {n} ({self.conditioner.describe()})")
        context = self.conditioner.expand(context, n, f"{type(self).__name__}.sample")
        ref = next(self.parameters())
        z = self.prior.sample((n, self.num_dims), temperature, device=ref.device, dtype=ref.dtype)
        return self.inverse(z, context)


class ConditionalVectorFlow(ConditionalFlow):
    """A conditional flow on vectors ``(B, D)``: a conditioner and one reversible stack."""

    def __init__(self, dim: int, layers: Sequence[nn.Module], conditioner: nn.Module,
                 memory: MemoryMode | str = MemoryMode.REVERSIBLE):
        super().__init__()
        self.num_dims = dim
        self.conditioner = conditioner
        self.flow = ReversibleSequential(*layers, memory=memory)

    def _check(self, x: Tensor, owner: str) -> None:
        if x.dim() != 2 or x.shape[1] != self.num_dims:
            raise ValueError(f"{type(self).__name__}.{owner}: expects vectors (B, {self.num_dims}), got "
                             f"shape {tuple(x.shape)}")

    def forward_and_log_det(self, x: Tensor, context=None) -> tuple[Tensor, Tensor]:
        self._check(x, "forward")
        return self.flow.forward_and_log_det(x, context=self.context_of(context, x.shape[0], "forward"))

    def inverse(self, z: Tensor, context=None) -> Tensor:
        self._check(z, "inverse")
        return self.flow.inverse(z, context=self.context_of(context, z.shape[0], "inverse"))


class MixturePriorFlow(ConditionalFlow):
    r"""A flow on vectors with a learned Gaussian per class as its prior: GIN's model.

    The bijection :math:`z = T(x)` does not see the label; the prior
    :math:`p(z \mid y) = \mathcal N(z; \mu_y, \operatorname{diag} \sigma_y^2)` is a
    :class:`~revtrain.flows.ClassConditionalGaussian` (Sorrenson et al. 2020):

    .. math::
        \log p(x \mid y) = \log \mathcal N(T(x); \mu_y, \sigma_y^2)
            + \log\left|\det \frac{\partial T}{\partial x}\right|, \qquad
        \log p(x) = \operatorname{logsumexp}_y \left(\log p(x \mid y) + \log p(y)\right).

    With GIN's volume-preserving couplings the log-det is 0 and the :math:`\sigma_y` carry
    all of the scale. As every conditional model here, ``forward_and_log_det(x, y)`` returns the
    standardised latent :math:`\epsilon = (T(x) - \mu_y) / \sigma_y` (standard normal under the
    model) with log-det :math:`\log|\det \partial T / \partial x| - \sum_i \log \sigma_{y,i}`,
    so ``log_prob(x, context=y)`` and ``sample(n, context=y, temperature)`` are those of
    :class:`ConditionalFlow`; :meth:`embed` gives GIN's representation :math:`T(x)` itself,
    :meth:`marginal_log_prob` the label-free density and :meth:`class_log_posterior`
    :math:`\log p(y \mid x)`.

    Args:
        dim: ``D``; input ``(B, ...)`` with ``D`` entries per sample is flattened.
        flow: the bijection, a stack from ``(B, D)`` to ``(B, D)``.
        num_classes: ``K``.
        init_scale, learn_weights: of the :class:`~revtrain.flows.ClassConditionalGaussian`.
    """

    def __init__(self, dim: int, flow: ReversibleSequential, num_classes: int,
                 init_scale: float = 1.0, learn_weights: bool = False):
        super().__init__()
        self.num_dims = dim
        self.conditioner = ClassLabels(num_classes)
        self.flow = flow
        self.mixture = ClassConditionalGaussian(num_classes, dim, init_scale, learn_weights)

    def _flat(self, x: Tensor, owner: str) -> Tensor:
        if x.dim() < 2 or x[0].numel() != self.num_dims:
            raise ValueError(f"{type(self).__name__}.{owner}: expects vectors (B, {self.num_dims}) or "
                             f"samples of {self.num_dims} entries, got shape {tuple(x.shape)}")
        return x.flatten(1)  # (B, D)

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""GIN's latent :math:`z = T(x)` ``(B, D)`` (no label needed) and the flow's log-det."""
        return self.flow.forward_and_log_det(self._flat(x, "embed"))

    def forward_and_log_det(self, x: Tensor, context=None) -> tuple[Tensor, Tensor]:
        x = self._flat(x, "forward")
        labels = self.context_of(context, x.shape[0], "forward")
        z, log_det = self.flow.forward_and_log_det(x)
        eps, ld = self.mixture.standardize(z, labels)
        return eps, log_det + ld  # (B, D), (B,)

    def inverse(self, z: Tensor, context=None) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.num_dims:
            raise ValueError(f"{type(self).__name__}.inverse: expects latents (B, {self.num_dims}), got "
                             f"shape {tuple(z.shape)}")
        labels = self.context_of(context, z.shape[0], "inverse")
        return self.flow.inverse(self.mixture.unstandardize(z, labels))

    def log_prob(self, x: Tensor, context=None) -> Tensor:
        r""":math:`\log p(x \mid y)` per sample ``(B,)``, in nats; ``context`` the labels ``(B,)``."""
        x = self._flat(x, "log_prob")
        labels = self.context_of(context, x.shape[0], "log_prob")
        z, log_det = self.flow.forward_and_log_det(x)
        return self.mixture.log_prob(z, labels) + log_det

    def marginal_log_prob(self, x: Tensor) -> Tensor:
        r""":math:`\log p(x) = \log \sum_y p(y)\, p(x \mid y)` per sample ``(B,)`` (no label)."""
        z, log_det = self.embed(x)
        return self.mixture.marginal_log_prob(z) + log_det

    def class_log_posterior(self, x: Tensor) -> Tensor:
        r""":math:`\log p(y \mid x)` ``(B, K)``: Bayes' rule on the prior (the log-det cancels)."""
        z, _ = self.embed(x)
        return self.mixture.class_log_posterior(z)


class ConditionalMultiScaleFlow(ConditionalFlow):
    """A class-conditional multi-scale image flow (see :func:`cond_realnvp`, :func:`cond_glow`).

    Preprocessing, then one reversible stack per level (its last ``factored[l]`` channels are
    factored out: already standardised by a :class:`ConditionalGaussianSplit`), then the
    class-conditional Gaussian of the last level's output. The latent is the concatenation of
    every factored-out part and the standardised top, each flattened: ``(B, D)``.
    """

    def __init__(self, input_shape: Sequence[int], preprocess: InvertibleModule,
                 levels: Sequence[ReversibleSequential], factored: Sequence[int],
                 output_shapes: Sequence[Sequence[int]], conditioner: nn.Module):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.preprocess = preprocess
        self.levels = nn.ModuleList(levels)
        self.factored = list(factored)
        self.output_shapes = [tuple(s) for s in output_shapes]
        self.conditioner = conditioner
        self.top = ConditionalNormal(self.output_shapes[-1][0], conditioner.dim)
        self.num_dims = math.prod(self.input_shape)

    def forward_and_log_det(self, x: Tensor, context=None) -> tuple[Tensor, Tensor]:
        if tuple(x.shape[1:]) != self.input_shape:
            expected = ", ".join(map(str, self.input_shape))
            raise ValueError(f"{type(self).__name__}.forward: expects images (B, {expected}), got shape "
                             f"{tuple(x.shape)}")
        c = self.context_of(context, x.shape[0], "forward")  # (B, K)
        h, log_det = self.preprocess.forward_and_log_det(x)
        zs = []
        for level, out in zip(self.levels, self.factored):
            h, ld = level.forward_and_log_det(h, context=c)  # (B, C_l, H_l, W_l)
            log_det = log_det + ld
            if out:
                keep = h.shape[1] - out
                zs.append(h[:, keep:].flatten(1))
                h = h[:, :keep]
        h, ld = self.top.standardize(h, c)
        zs.append(h.flatten(1))
        return torch.cat(zs, dim=1), log_det + ld  # (B, D)

    def inverse(self, z: Tensor, context=None) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.num_dims:
            raise ValueError(f"{type(self).__name__}.inverse: expects latents (B, {self.num_dims}), got "
                             f"shape {tuple(z.shape)}")
        c = self.context_of(context, z.shape[0], "inverse")
        sizes = [out * s[1] * s[2] for s, out in zip(self.output_shapes, self.factored) if out]
        parts = list(torch.split(z, [*sizes, z.shape[1] - sum(sizes)], dim=1))
        last = self.output_shapes[-1]
        h = self.top.unstandardize(parts.pop().reshape(z.shape[0], *last), c)
        for level, shape, out in zip(reversed(self.levels), reversed(self.output_shapes),
                                     reversed(self.factored)):
            if out:
                h = torch.cat([h, parts.pop().reshape(z.shape[0], out, shape[1], shape[2])], dim=1)
            h = level.inverse(h, context=c)
        return self.preprocess.inverse(h)


def _permutation(dim: int, generator: torch.Generator) -> list[int]:
    return torch.randperm(dim, generator=generator).tolist()


@register_model
def cinn(dim: int = 4, cond_dim: int = 2, num_blocks: int = 8, hidden: int = 128, depth: int = 2,
         cond_features: int = 16, cond_hidden: int = 64, clamp: float = 2.0, permute: bool = True,
         seed: int = 0, memory: MemoryMode | str = MemoryMode.REVERSIBLE) -> ConditionalVectorFlow:
    r"""A conditional INN for posterior estimation :math:`p(x \mid y)` on vectors.

    ``num_blocks`` x (affine coupling of both halves, :math:`y_1 = x_1 e^{s_1} + t_1` with
    :math:`(s_1, t_1) = f(x_2, h)`, :math:`y_2 = x_2 e^{s_2} + t_2` with :math:`(s_2, t_2) = g(y_1, h)`,
    soft clamp ``clamp``; then a fixed random permutation when ``permute``). ``f`` and ``g`` are
    MLPs of ``depth`` hidden layers of width ``hidden`` (zero last layer: every block starts as
    the identity) on ``cat(half, h)``, where :math:`h` is the conditioning network's output:
    an MLP ``cond_dim -> cond_hidden -> cond_features`` (``cond_hidden=0``: :math:`h = y`).
    Permutations are drawn from a generator seeded with ``seed`` (not the global one).
    """
    if dim < 2:
        raise ValueError(f"cinn: dim must be at least 2 to split, got {dim}")
    conditioner = ObservationNet(cond_dim, cond_features, cond_hidden)
    k = conditioner.features
    d1, d2 = dim // 2, dim - dim // 2
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(num_blocks):
        f = ConditionalNet(MLP(d2 + k, 2 * d1, hidden, depth))
        g = ConditionalNet(MLP(d1 + k, 2 * d2, hidden, depth))
        layers.append(AffineCoupling(f, g, clamp=clamp))
        if permute:
            layers.append(ChannelPermute(_permutation(dim, gen)))
    return ConditionalVectorFlow(dim, layers, conditioner, memory)


@register_model
@variant_of(cinn)
def cinn_ik(**kwargs) -> ConditionalVectorFlow:
    """:func:`cinn` sized for the inverse-kinematics arm (4-D ``x``, 2-D end point ``y``)."""
    kwargs = {"dim": 4, "cond_dim": 2, "num_blocks": 8, "hidden": 128, **kwargs}
    return cinn(**kwargs)


def _check_image(name: str, in_channels: int, image_size: int, levels: int, num_classes: int) -> None:
    if levels < 1:
        raise ValueError(f"{name}: levels must be at least 1, got {levels}")
    if image_size % (2 ** levels):
        raise ValueError(f"{name}: image_size={image_size} must be divisible by 2**levels = "
                         f"{2 ** levels}; use fewer levels or pad the images")
    if in_channels < 1:
        raise ValueError(f"{name}: in_channels must be positive, got {in_channels}")
    if num_classes < 2:
        raise ValueError(f"{name}: num_classes must be at least 2, got {num_classes}")


def _cond_coupling(net: nn.Module, mask, clamp: float | None) -> Coupling:
    return Coupling(net, None, Additive() if clamp is None else Affine(clamp), split=mask)


@register_model
def cond_realnvp(in_channels: int = 3, image_size: int = 32, levels: int = 3, hidden: int = 64,
                 num_classes: int = 10, embed_dim: int = 16, clamp: float = 2.0, alpha: float = 0.05,
                 actnorm: bool = True, split_prior: bool = True,
                 memory: MemoryMode | str = MemoryMode.REVERSIBLE) -> ConditionalMultiScaleFlow:
    """Class-conditional RealNVP: :func:`revtrain.models.realnvp`'s multi-scale architecture with
    every coupling network, every split prior and the top prior conditioned on a label embedding.

    Per level: 3 checkerboard affine couplings (4 in the last level), then a squeeze, 3
    channel-wise couplings and (``split_prior``) a :class:`ConditionalGaussianSplit` of the
    factored-out half; ActNorm after each coupling (``actnorm``). Logit preprocessing with
    ``alpha``. Data in ``[0, 1]`` of shape ``(in_channels, image_size, image_size)``; condition:
    labels ``(B,)``.
    """
    _check_image("cond_realnvp", in_channels, image_size, levels, num_classes)
    k = embed_dim
    stacks, factored, shapes = [], [], []
    c, s = in_channels, image_size
    for level in range(levels):
        last = level == levels - 1
        layers: list[nn.Module] = []
        for i in range(4 if last else 3):
            mask = CheckerboardMask(i % 2)
            net = ConditionalCheckerboardNet(ConvNet(c + 1 + k, 2 * c, hidden), mask)
            layers.append(_cond_coupling(net, mask, clamp))
            if actnorm:
                layers.append(ActNorm(c))
        if not last:
            layers.append(Squeeze(2))
            c, s = 4 * c, s // 2
            kept, transformed = split_sizes(c)
            for i in range(3):
                net = ConditionalNet(ConvNet(kept + k, 2 * transformed, hidden))
                layers.append(_cond_coupling(net, ChannelMask(flip=bool(i % 2)), clamp))
                if actnorm:
                    layers.append(ActNorm(c))
            if split_prior:
                layers.append(ConditionalGaussianSplit(c, k))
        stacks.append(ReversibleSequential(*layers, memory=memory))
        shapes.append((c, s, s))
        out = 0 if last else split_sizes(c)[1]
        factored.append(out)
        c -= out
    return ConditionalMultiScaleFlow((in_channels, image_size, image_size), LogitTransform(alpha),
                                     stacks, factored, shapes, LabelEmbedding(num_classes, k))


@register_model
@variant_of(cond_realnvp)
def cond_realnvp_digits(**kwargs) -> ConditionalMultiScaleFlow:
    """:func:`cond_realnvp` for scikit-learn's 8x8 digits: 1 channel, 2 levels, width 32, 10 classes."""
    kwargs = {"in_channels": 1, "image_size": 8, "levels": 2, "hidden": 32, "num_classes": 10,
              "embed_dim": 8, **kwargs}
    return cond_realnvp(**kwargs)


@register_model
def cond_glow(in_channels: int = 3, image_size: int = 32, levels: int = 3, steps: int = 32,
              hidden: int = 512, num_classes: int = 10, embed_dim: int = 16, clamp: float = 2.0,
              lu: bool = True, memory: MemoryMode | str = MemoryMode.REVERSIBLE
              ) -> ConditionalMultiScaleFlow:
    """Class-conditional Glow: per level a squeeze, ``steps`` x (ActNorm, 1x1 convolution (LU),
    affine half coupling whose network takes the label embedding), and (except the last level)
    a class-conditional split prior; a class-conditional top prior (Glow's appendix)."""
    _check_image("cond_glow", in_channels, image_size, levels, num_classes)
    k = embed_dim
    stacks, factored, shapes = [], [], []
    c, s = in_channels, image_size
    for level in range(levels):
        last = level == levels - 1
        c, s = 4 * c, s // 2
        layers: list[nn.Module] = [Squeeze(2)]
        kept, transformed = split_sizes(c)
        for _ in range(steps):
            layers += [ActNorm(c), InvConv1x1LU(c) if lu else InvConv1x1(c),
                       AffineCoupling(ConditionalNet(ConvNet(kept + k, 2 * transformed, hidden)), None,
                                      clamp=clamp)]
        if not last:
            layers.append(ConditionalGaussianSplit(c, k))
        stacks.append(ReversibleSequential(*layers, memory=memory))
        shapes.append((c, s, s))
        out = 0 if last else split_sizes(c)[1]
        factored.append(out)
        c -= out
    return ConditionalMultiScaleFlow((in_channels, image_size, image_size), CenterShift(), stacks,
                                     factored, shapes, LabelEmbedding(num_classes, k))


@register_model
@variant_of(cond_glow)
def cond_glow_digits(**kwargs) -> ConditionalMultiScaleFlow:
    """:func:`cond_glow` for scikit-learn's 8x8 digits: 1 channel, 2 levels of 8 steps, width 32."""
    kwargs = {"in_channels": 1, "image_size": 8, "levels": 2, "steps": 8, "hidden": 32,
              "num_classes": 10, "embed_dim": 8, **kwargs}
    return cond_glow(**kwargs)


@register_model(input_size=(2,), paper="GIN (Sorrenson et al. 2020)")
def cond_gin(dim: int = 2, num_classes: int = 8, num_layers: int = 8, hidden: int = 64,
             depth: int = 2, clamp: float = 2.0, init_scale: float = 1.0, learn_weights: bool = False,
             memory: MemoryMode | str = MemoryMode.REVERSIBLE) -> MixturePriorFlow:
    """GIN (Sorrenson et al. 2020): volume-preserving couplings and a learned Gaussian per class.

    The bijection is :func:`revtrain.models.gin` (``num_layers`` affine half couplings with
    alternating masks whose log-scales sum to 0 per sample, MLPs of ``depth`` hidden layers of
    width ``hidden``: log-det exactly 0), the prior a
    :class:`~revtrain.flows.ClassConditionalGaussian` with ``num_classes`` classes (learned
    means, random at ``init_scale``, and log-stds; uniform class weights unless
    ``learn_weights``). Condition: labels ``(B,)``.
    """
    flow = gin(dim=dim, num_layers=num_layers, hidden=hidden, depth=depth, clamp=clamp,
               memory=memory).flow
    return MixturePriorFlow(dim, flow, num_classes, init_scale, learn_weights)


@register_model(input_size=(64,), paper="GIN (Sorrenson et al. 2020)")
@variant_of(cond_gin)
def cond_gin_digits(**kwargs) -> MixturePriorFlow:
    """:func:`cond_gin` for scikit-learn's 8x8 digits (64 entries per image, 10 classes), width 128."""
    kwargs = {"dim": 64, "num_classes": 10, "num_layers": 8, "hidden": 128, **kwargs}
    return cond_gin(**kwargs)


# --------------------------------------------------------------------------- i-RIM toy


class _DataGradientNet(nn.Module):
    r"""``net(cat([x, A^T A x - b]))``: a sub-network that sees the data-term gradient.

    ``x`` is the current estimate, the context ``b = A^T y`` the back-projected measurement, so
    :math:`A^\top A x - b = \nabla_x \tfrac12 \lVert A x - y \rVert^2`.
    """

    def __init__(self, gram: Tensor, n: int, hidden: int):
        super().__init__()
        self.register_buffer("gram", gram)
        self.net = MLP(2 * n, n, hidden, depth=2)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        grad = x @ self.gram - context  # (B, n); gram is symmetric
        return self.net(torch.cat([x, grad], dim=1))


class _MemoryNet(nn.Module):
    """``net(cat([s, b]))``: an update of the estimate from the memory and the context."""

    def __init__(self, n: int, hidden: int):
        super().__init__()
        self.net = MLP(2 * n, n, hidden, depth=2)

    def forward(self, s: Tensor, context: Tensor) -> Tensor:
        return self.net(torch.cat([s, context], dim=1))


class IterativeRefinement(nn.Module):
    r"""An i-RIM-style reversible recurrent refinement of :math:`x` from :math:`y = A x + \text{noise}`.

    The state is :math:`(s, \hat x)` (memory and estimate, ``n`` each), starting at
    :math:`(0, A^\top y)`. Each of ``iterations`` steps is an additive coupling with the same
    two networks (weight-shared, a recurrent net):

    .. math::
        s \leftarrow s + f(\hat x, A^\top A \hat x - A^\top y), \qquad
        \hat x \leftarrow \hat x + g(s, A^\top y),

    with the back-projected measurement :math:`A^\top y` as the stack's context. The steps form
    one reversible stack, so with ``memory="reversible"`` training memory does not grow with the
    number of iterations, and the measurement receives its exact gradient (i-RIM's own code
    gives none to it).

    Args:
        operator: the measurement matrix :math:`A`, shape ``(m, n)``.
        iterations: number of refinement steps.
        hidden: width of the two MLPs.
    """

    def __init__(self, operator: Tensor, iterations: int = 8, hidden: int = 64,
                 memory: MemoryMode | str = MemoryMode.REVERSIBLE):
        super().__init__()
        if operator.dim() != 2:
            raise ValueError(f"IterativeRefinement: operator must be a matrix (m, n), got shape "
                             f"{tuple(operator.shape)}")
        if iterations < 1:
            raise ValueError(f"IterativeRefinement: iterations must be at least 1, got {iterations}")
        self.register_buffer("operator", operator.clone())
        self.input_shape = (operator.shape[0],)  # measurements (B, m)
        n = operator.shape[1]
        self.n, self.iterations = n, iterations
        self.f = _DataGradientNet(operator.T @ operator, n, hidden)
        self.g = _MemoryNet(n, hidden)
        self.steps = ReversibleSequential(*[AdditiveCoupling(self.f, self.g) for _ in range(iterations)],
                                          memory=memory)

    def measure(self, x: Tensor) -> Tensor:
        """:math:`A x` for signals ``(B, n)``."""
        return x @ self.operator.T

    def forward(self, y: Tensor) -> Tensor:
        """The refined estimate ``(B, n)`` from measurements ``y`` ``(B, m)``."""
        if y.dim() != 2 or y.shape[1] != self.operator.shape[0]:
            raise ValueError(f"IterativeRefinement: expects measurements (B, {self.operator.shape[0]}), "
                             f"got shape {tuple(y.shape)}")
        b = y @ self.operator  # A^T y: (B, n)
        state = torch.cat([torch.zeros_like(b), b], dim=1)  # (B, 2n): memory, estimate
        return self.steps(state, context=b)[:, self.n:]


@register_model
def irim_toy(n: int = 32, m: int = 16, iterations: int = 8, hidden: int = 64, seed: int = 0,
             memory: MemoryMode | str = MemoryMode.REVERSIBLE) -> IterativeRefinement:
    """:class:`IterativeRefinement` with a random Gaussian ``(m, n)`` measurement matrix
    (entries :math:`\\mathcal N(0, 1/m)`, drawn from a generator seeded with ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    operator = torch.randn(m, n, generator=gen) / math.sqrt(m)
    return IterativeRefinement(operator, iterations, hidden, memory)

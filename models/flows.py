r"""Flow generators: NICE, RealNVP and Glow, trained through the reversible engine.

Every model is a :class:`revtrain.InvertibleModule` from data :math:`x` to a flat latent
:math:`z` of shape ``(B, D)`` (all factored-out parts of a multi-scale model concatenated), with

.. math::
    \log p(x) = \log \mathcal{P}(z) + \log\left|\det \frac{\partial z}{\partial x}\right|

for a fixed base density :math:`\mathcal P` (``model.prior``). ``log_prob(x)`` returns it per
sample, ``sample(n, temperature)`` draws :math:`z` at a temperature and inverts.

The layers of each level form one :class:`revtrain.ReversibleSequential`, so with
``memory="reversible"`` (default) a level keeps only its output: activation memory does not
grow with the number of steps ``K``. ``memory="stored"`` is the ordinary-autograd twin,
``"checkpoint"`` per-layer checkpointing; same parameters and results in every mode, and the
``memory`` attribute switches an existing model.

Image models take data in :math:`[0, 1]` (dequantized, see :mod:`revtrain.flows.dequant`).
RealNVP starts with the logit transform, so ``log_prob`` is a density on :math:`[0, 1]^D`; Glow
starts with :math:`x - \tfrac12` by default (as openai/glow), a density on :math:`\mathbb R^D`
that may put mass outside the unit cube, or with the logit transform (``preprocess="logit"``).
Every coupling takes its element-wise transform by name (``transform=``): ``"affine"``
(RealNVP, Glow), ``"additive"`` (NICE), ``"gin"`` (volume preserving, GIN) or ``"spline"``
(rational-quadratic, neural spline flows); the affine transform's scale by name (``scale=``):
``"tanh"`` (a soft clamp, default), ``"sigmoid"`` (the Glow code's) or ``"learned_tanh"``
(RealNVP's). ``glow(learn_top=True)`` learns the top prior (openai/glow ``--learntop``);
``realnvp(coupling_net="resnet")`` uses RealNVP's residual coupling networks.

References:
    Dinh et al., "NICE", 2014. Dinh et al., "Density estimation using Real NVP", 2016.
    Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    Durkan et al., "Neural Spline Flows", 2019. Sorrenson et al., "GIN", 2020.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from revtrain import (
    Additive,
    Affine,
    AffineCoupling,
    ChannelSplit,
    Coupling,
    MemoryMode,
    RationalQuadratic,
    ReversibleSequential,
    SigmoidAffine,
    VolumePreservingAffine,
)
from revtrain.base import InvertibleModule
from revtrain.flows import (
    MLP,
    ActNorm,
    CenterShift,
    ChannelMask,
    CheckerboardMask,
    CheckerboardNet,
    ConvNet,
    DiagonalScaling,
    GaussianSplit,
    InvConv1x1,
    InvConv1x1LU,
    LearnedTanhScale,
    LearnedTopPrior,
    LogitTransform,
    ResNet,
    StandardNormal,
    make_prior,
    split_sizes,
)
from revtrain.layers import Squeeze
from revtrain.modes import MemoryModeMixin

from ._registry import register_model

__all__ = ["FlowModel", "VectorFlow", "MultiScaleFlow", "glow_step", "glow_level",
           "make_transform", "nice", "realnvp", "glow", "nsf", "gin", "spline_realnvp",
           "spline_glow"]

TRANSFORMS = ("affine", "additive", "gin", "spline")
SCALES = ("tanh", "sigmoid", "learned_tanh")
COUPLING_NETS = ("conv", "resnet")


def make_transform(name: str, clamp: float | None = 2.0, bins: int = 8, bound: float = 3.0,
                   scale: str = "tanh"):
    r"""The element-wise coupling transform called ``name``.

    ``"affine"``: by ``scale``, :class:`~revtrain.Affine` with soft clamp ``clamp``
    (``"tanh"``: :math:`s = c \tanh(\tilde s / c)`), :class:`~revtrain.SigmoidAffine`
    (``"sigmoid"``: :math:`y = (x + t)\,\sigma(\tilde s + 2)`, the Glow code) or
    ``Affine(clamp=None)`` (``"learned_tanh"``: RealNVP's :math:`s = a \tanh(\tilde s)`, whose
    learned :math:`a` lives in the sub-network, :class:`~revtrain.flows.LearnedTanhScale`);
    ``"additive"``: :class:`~revtrain.Additive`; ``"gin"``:
    :class:`~revtrain.VolumePreservingAffine`; ``"spline"``: :class:`~revtrain.RationalQuadratic`
    with ``bins`` bins on ``[-bound, bound]``.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown affine scale {scale!r}; use one of {', '.join(SCALES)}")
    if scale != "tanh" and name != "affine":
        raise ValueError(f"scale={scale!r} applies to the affine transform only, got "
                         f"transform={name!r}; use transform='affine' or scale='tanh'")
    if name == "affine":
        if scale == "sigmoid":
            return SigmoidAffine()
        return Affine(None if scale == "learned_tanh" else clamp)
    if name == "additive":
        return Additive()
    if name == "gin":
        return VolumePreservingAffine(clamp)
    if name == "spline":
        return RationalQuadratic(bins=bins, bound=bound)
    raise ValueError(f"unknown coupling transform {name!r}; use one of {', '.join(TRANSFORMS)}")


def _preprocess(name: str, preprocess: str, alpha: float) -> InvertibleModule:
    if preprocess == "logit":
        return LogitTransform(alpha)
    if preprocess == "center":
        return CenterShift()
    raise ValueError(f"{name}: preprocess must be 'logit' or 'center', got {preprocess!r}")


class FlowModel(MemoryModeMixin, InvertibleModule):
    """Common part of the flow models: ``log_prob``, ``sample`` and the ``memory`` switch
    (:class:`revtrain.modes.MemoryModeMixin`)."""

    prior: nn.Module
    num_dims: int

    def log_prob(self, x: Tensor) -> Tensor:
        r""":math:`\log p(x)` per sample, shape ``(batch,)``, in nats."""
        z, log_det = self.forward_and_log_det(x)
        return self.prior.log_prob(z) + log_det

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """``n`` samples, drawing the latent at ``temperature`` (1: the model's density)."""
        ref = next(self.parameters())
        z = self.prior.sample((n, self.num_dims), temperature, device=ref.device, dtype=ref.dtype)
        return self.inverse(z)


class VectorFlow(FlowModel):
    """A flow on vectors ``(B, D)``: one reversible stack of layers and a base density.

    Input of any shape ``(B, ...)`` with ``D`` entries per sample (e.g. 8x8 images for
    ``D = 64``) is flattened to ``(B, D)``; samples and ``inverse`` are ``(B, D)``.

    Args:
        dim: ``D``.
        layers: invertible layers mapping ``(B, D)`` to ``(B, D)``.
        prior: the base density (``log_prob`` / ``sample``).
        memory: memory mode of the stack.
    """

    def __init__(self, dim: int, layers: Sequence[nn.Module], prior: nn.Module,
                 memory: MemoryMode | str = MemoryMode.REVERSIBLE):
        super().__init__()
        self.num_dims = dim
        self.flow = ReversibleSequential(*layers, memory=memory)
        self.prior = prior

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() < 2 or x[0].numel() != self.num_dims:
            raise ValueError(f"{type(self).__name__}: expects vectors (B, {self.num_dims}) or "
                             f"samples of {self.num_dims} entries, got shape {tuple(x.shape)}")
        return self.flow.forward_and_log_det(x.flatten(1))  # (B, D)

    def inverse(self, z: Tensor) -> Tensor:
        return self.flow.inverse(z)


class MultiScaleFlow(FlowModel):
    """A multi-scale image flow: preprocessing, then levels with factoring-out between them.

    Level ``l`` is a reversible stack whose output has ``C_l`` channels; its last
    ``factored[l]`` channels are factored out (scored by the prior) and the rest go on to the
    next level. The latent ``z`` is the concatenation of every factored-out part and the last
    level's output, each flattened.

    Args:
        input_shape: ``(C, H, W)`` of one sample.
        preprocess: an invertible layer applied first (logit or centring).
        levels: one :class:`revtrain.ReversibleSequential` per level.
        factored: channels factored out after each level (0 for the last).
        output_shapes: ``(C_l, H_l, W_l)`` of each level's output.
    """

    def __init__(self, input_shape: Sequence[int], preprocess: InvertibleModule,
                 levels: Sequence[ReversibleSequential], factored: Sequence[int],
                 output_shapes: Sequence[Sequence[int]]):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.preprocess = preprocess
        self.levels = nn.ModuleList(levels)
        self.factored = list(factored)
        self.output_shapes = [tuple(s) for s in output_shapes]
        self.prior = StandardNormal()
        self.num_dims = int(torch.tensor(self.input_shape).prod())

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if tuple(x.shape[1:]) != self.input_shape:
            expected = ", ".join(map(str, self.input_shape))
            raise ValueError(f"{type(self).__name__}: expects images (B, {expected}), got shape "
                             f"{tuple(x.shape)}")
        h, log_det = self.preprocess.forward_and_log_det(x)
        zs = []
        for level, out in zip(self.levels, self.factored):
            h, ld = level.forward_and_log_det(h)  # (B, C_l, H_l, W_l)
            log_det = log_det + ld
            if out:
                keep = h.shape[1] - out
                zs.append(h[:, keep:].flatten(1))  # factored out: (B, out * H_l * W_l)
                h = h[:, :keep]
        zs.append(h.flatten(1))
        return torch.cat(zs, dim=1), log_det  # (B, D)

    def inverse(self, z: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.num_dims:
            raise ValueError(f"{type(self).__name__}.inverse: expects latents "
                             f"(B, {self.num_dims}), got shape {tuple(z.shape)}")
        sizes = []
        for shape, out in zip(self.output_shapes, self.factored):
            if out:
                sizes.append(out * shape[1] * shape[2])
        sizes.append(z.shape[1] - sum(sizes))
        parts = list(torch.split(z, sizes, dim=1))
        last = self.output_shapes[-1]
        h = parts.pop().reshape(z.shape[0], *last)
        for level, shape, out in zip(reversed(self.levels), reversed(self.output_shapes),
                                     reversed(self.factored)):
            if out:
                factored = parts.pop().reshape(z.shape[0], out, shape[1], shape[2])
                h = torch.cat([h, factored], dim=1)
            h = level.inverse(h)
        return self.preprocess.inverse(h)


def _check_image(name: str, in_channels: int, image_size: int, levels: int) -> None:
    if levels < 1:
        raise ValueError(f"{name}: levels must be at least 1, got {levels}")
    if image_size % (2 ** levels):
        raise ValueError(
            f"{name}: image_size={image_size} must be divisible by 2**levels = {2 ** levels} "
            f"(each level halves the size and its couplings need an even width); use "
            f"levels <= {max((image_size & -image_size).bit_length() - 1, 0)} or pad the images"
        )
    if in_channels < 1:
        raise ValueError(f"{name}: in_channels must be positive, got {in_channels}")


def glow_step(channels: int, hidden: int, clamp: float = 2.0, lu: bool = True,
              transform: str = "affine", bins: int = 8, bound: float = 3.0,
              scale: str = "tanh") -> list[nn.Module]:
    """One Glow step of flow: ActNorm, invertible 1x1 convolution, half coupling
    (``transform`` and ``scale``, see :func:`make_transform`; affine in Glow)."""
    kept, transformed = split_sizes(channels)
    if transform == "affine" and scale == "tanh":
        coupling: nn.Module = AffineCoupling(ConvNet(kept, 2 * transformed, hidden), None,
                                             split_dim=1, clamp=clamp)
    else:
        t = make_transform(transform, clamp, bins, bound, scale)
        coupling = _coupling(lambda k: ConvNet(kept, k * transformed, hidden), ChannelSplit(1),
                             t, transformed if scale == "learned_tanh" else 0)
    return [
        ActNorm(channels),
        InvConv1x1LU(channels) if lu else InvConv1x1(channels),
        coupling,
    ]


def glow_level(in_channels: int, steps: int, hidden: int, squeeze: bool = True,
               split: bool = False, clamp: float = 2.0, lu: bool = True,
               memory: MemoryMode | str = MemoryMode.REVERSIBLE, transform: str = "affine",
               bins: int = 8, bound: float = 3.0, scale: str = "tanh",
               top_prior: Sequence[int] | None = None) -> ReversibleSequential:
    """One Glow level as a reversible stack: [squeeze], ``steps`` steps, [Gaussian split],
    [learned top prior].

    Args:
        in_channels: channels of the level input (before the squeeze).
        steps: ``K``.
        hidden: width of the coupling networks.
        squeeze: start with a 2x2 squeeze (``C -> 4C``).
        split: end with a :class:`~revtrain.flows.GaussianSplit` (learned conditional prior
            of the half that the model factors out).
        scale: the affine transform's scale (:func:`make_transform`).
        top_prior: ``(C, H, W)`` of the level's output: end with a
            :class:`~revtrain.flows.LearnedTopPrior` of that shape (the last level, with
            ``learn_top``).
    """
    c = 4 * in_channels if squeeze else in_channels
    layers: list[nn.Module] = [Squeeze(2)] if squeeze else []
    for _ in range(steps):
        layers += glow_step(c, hidden, clamp, lu, transform, bins, bound, scale)
    if split:
        layers.append(GaussianSplit(c))
    if top_prior is not None:
        layers.append(LearnedTopPrior(top_prior))
    return ReversibleSequential(*layers, memory=memory)


@register_model(input_size=(3, 32, 32), paper="Glow (Kingma & Dhariwal 2018)")
def glow(in_channels: int = 3, image_size: int = 32, levels: int = 3, steps: int = 32,
         hidden: int = 512, clamp: float = 2.0, lu: bool = True, split_prior: bool = True,
         memory: MemoryMode | str = MemoryMode.REVERSIBLE, preprocess: str = "center",
         alpha: float = 0.05, transform: str = "affine", bins: int = 8,
         bound: float = 3.0, scale: str = "tanh", learn_top: bool = False) -> MultiScaleFlow:
    r"""Glow (Kingma & Dhariwal 2018): ``levels`` levels of ``steps`` steps each.

    Each level: squeeze, ``K`` x (ActNorm, LU 1x1 convolution, affine coupling), then (except
    the last) a learned conditional Gaussian prior (``split_prior``; otherwise a standard
    normal) and factoring-out of half the channels.
    Data in ``[0, 1]``, shape ``(in_channels, image_size, image_size)``. ``preprocess``:
    ``"center"`` (:math:`x - 1/2`, openai/glow; a density on :math:`\mathbb R^D`, which may
    put mass outside the unit cube) or ``"logit"`` (RealNVP's logit with margin ``alpha``; a
    density on :math:`[0, 1]^D`, and measured better on digits). ``transform`` and ``scale`` as
    in :func:`make_transform` (``bins``, ``bound`` for ``"spline"``; ``scale="sigmoid"`` is the
    openai/glow code's :math:`\sigma(\tilde s + 2)`). ``learn_top``: a learned diagonal
    Gaussian prior of the last level's output (:class:`~revtrain.flows.LearnedTopPrior`,
    openai/glow ``--learntop``) instead of a standard normal.
    """
    _check_image("glow", in_channels, image_size, levels)
    pre = _preprocess("glow", preprocess, alpha)
    make_transform(transform, clamp, bins, bound, scale)  # bad names fail before any layer
    stacks, factored, shapes = [], [], []
    c, s = in_channels, image_size
    for level in range(levels):
        last = level == levels - 1
        top = (4 * c, s // 2, s // 2) if last and learn_top else None
        stacks.append(glow_level(c, steps, hidden, squeeze=True, split=split_prior and not last,
                                 clamp=clamp, lu=lu, memory=memory, transform=transform,
                                 bins=bins, bound=bound, scale=scale, top_prior=top))
        c, s = 4 * c, s // 2
        shapes.append((c, s, s))
        out = 0 if last else split_sizes(c)[1]
        factored.append(out)
        c -= out
    return MultiScaleFlow((in_channels, image_size, image_size), pre, stacks, factored, shapes)


def _coupling(make_net, mask, transform, learned_scale: int = 0) -> Coupling:
    """A half coupling with ``mask`` and ``transform``; ``make_net(k)`` builds its network for
    ``k`` parameters per transformed entry. ``learned_scale``: wrap the network in a
    :class:`~revtrain.flows.LearnedTanhScale` over that many transformed channels."""
    net = make_net(transform.num_params)
    if learned_scale:
        net = LearnedTanhScale(net, learned_scale)
    return Coupling(net, None, transform, split=mask)


@register_model(input_size=(3, 32, 32), paper="RealNVP (Dinh et al. 2016)")
def realnvp(in_channels: int = 3, image_size: int = 32, levels: int = 3, hidden: int = 64,
            dim: int | None = None, num_layers: int = 8, depth: int = 2, clamp: float = 2.0,
            alpha: float = 0.05, actnorm: bool = True, split_prior: bool = False,
            memory: MemoryMode | str = MemoryMode.REVERSIBLE, transform: str = "affine",
            bins: int = 8, bound: float = 3.0, scale: str = "tanh", coupling_net: str = "conv",
            num_blocks: int = 8) -> FlowModel:
    """RealNVP (Dinh et al. 2016), for images (multi-scale) or, with ``dim``, for vectors.

    Images: logit preprocessing, then per level 3 checkerboard affine couplings, a squeeze,
    3 channel-wise couplings and factoring-out of half the channels; the last level has 4
    checkerboard couplings. Vectors (``dim`` given): ``num_layers`` affine couplings with
    alternating masks, MLP sub-networks of ``depth`` hidden layers. ``actnorm`` adds an ActNorm
    after every coupling; ``split_prior`` a learned conditional prior at each split (Glow's).
    ``transform`` and ``scale`` as in :func:`make_transform` (``"affine"`` in the paper, whose
    log-scale is ``scale="learned_tanh"``; ``"spline"`` with ``bins`` bins on
    ``[-bound, bound]``). ``coupling_net``: ``"conv"`` (Glow's three convolutions, ``hidden``
    wide) or ``"resnet"`` (the paper's: :class:`~revtrain.flows.ResNet` with ``num_blocks``
    residual blocks of ``hidden`` features; images only). The paper's CIFAR-10 model:
    ``levels=2, coupling_net="resnet", num_blocks=8, hidden=64, scale="learned_tanh"``.
    """
    def t():
        return make_transform(transform, clamp, bins, bound, scale)

    t()  # a bad transform or scale name fails before any layer is built
    if coupling_net not in COUPLING_NETS:
        raise ValueError(f"realnvp: unknown coupling_net {coupling_net!r}; use one of "
                         f"{', '.join(COUPLING_NETS)}")
    learned = scale == "learned_tanh"
    if dim is not None:
        if coupling_net != "conv":
            raise ValueError("realnvp: coupling_net='resnet' is for images; vectors (dim=...) "
                             "use MLPs (hidden, depth)")
        return _vector_flow(dim, num_layers, hidden, depth, t, actnorm, False, memory,
                            learned=learned)

    def net(n_in: int, n_out: int) -> nn.Module:
        if coupling_net == "resnet":
            return ResNet(n_in, n_out, hidden, num_blocks)
        return ConvNet(n_in, n_out, hidden)

    _check_image("realnvp", in_channels, image_size, levels)
    stacks, factored, shapes = [], [], []
    c, s = in_channels, image_size
    for level in range(levels):
        last = level == levels - 1
        layers = []
        for i in range(4 if last else 3):
            mask = CheckerboardMask(i % 2)
            layers.append(_coupling(
                lambda k, c=c, mask=mask: CheckerboardNet(net(c + 1, k * c), mask),
                mask, t(), c if learned else 0))
            if actnorm:
                layers.append(ActNorm(c))
        if not last:
            layers.append(Squeeze(2))
            c, s = 4 * c, s // 2
            kept, transformed = split_sizes(c)
            for i in range(3):
                layers.append(_coupling(
                    lambda k, kept=kept, transformed=transformed: net(kept, k * transformed),
                    ChannelMask(flip=bool(i % 2)), t(), transformed if learned else 0))
                if actnorm:
                    layers.append(ActNorm(c))
            if split_prior:
                layers.append(GaussianSplit(c))
        stacks.append(ReversibleSequential(*layers, memory=memory))
        shapes.append((c, s, s))
        out = 0 if last else split_sizes(c)[1]
        factored.append(out)
        c -= out
    return MultiScaleFlow((in_channels, image_size, image_size), LogitTransform(alpha), stacks,
                          factored, shapes)


def _vector_flow(dim: int, num_layers: int, hidden: int, depth: int, make_t, actnorm: bool,
                 lu: bool, memory: MemoryMode | str, steps: bool = False,
                 learned: bool = False) -> VectorFlow:
    """``num_layers`` x (half coupling with alternating masks, [ActNorm]); with ``steps``,
    Glow's order instead: ([ActNorm], [LU linear layer], coupling). ``learned``: RealNVP's
    learned tanh scale around each MLP."""
    if dim < 2:
        raise ValueError(f"a coupling flow on vectors needs dim >= 2 to split, got {dim}")
    layers: list[nn.Module] = []
    for i in range(num_layers):
        mask = CheckerboardMask(i % 2)
        n1 = len(range(mask.parity, dim, 2))
        coupling = _coupling(lambda k, n1=n1: MLP(dim - n1, k * n1, hidden, depth), mask,
                             make_t(), n1 if learned else 0)
        if not steps:
            layers += [coupling, ActNorm(dim)] if actnorm else [coupling]
            continue
        if actnorm:
            layers.append(ActNorm(dim))
        if lu:
            layers.append(InvConv1x1LU(dim))
        layers.append(coupling)
    return VectorFlow(dim, layers, StandardNormal(), memory)


@register_model(input_size=(2,), paper="Neural spline flows (Durkan et al. 2019), coupling")
def nsf(dim: int = 2, num_layers: int = 4, hidden: int = 64, depth: int = 2, bins: int = 8,
        bound: float = 4.0, actnorm: bool = False, lu: bool = False,
        memory: MemoryMode | str = MemoryMode.REVERSIBLE) -> VectorFlow:
    """Neural spline flow on vectors: rational-quadratic spline couplings (Durkan et al. 2019).

    ``num_layers`` x ([ActNorm], [LU linear layer], spline half coupling with alternating
    masks), MLP sub-networks of ``depth`` hidden layers of width ``hidden``, ``bins`` bins on
    ``[-bound, bound]`` and identity tails outside; standard normal prior. The defaults are the
    configuration of the 2-D density benchmark (``benchmarks/flows.py --only 2d-spline``): no
    ActNorm, no LU layers (both measured worse there), so data should lie mostly inside
    ``[-bound, bound]``; ``actnorm=True`` normalises the scale first. The spline coupling written
    once (:class:`revtrain.RationalQuadratic`) trains through the fused reversible backward.
    """
    return _vector_flow(dim, num_layers, hidden, depth,
                        lambda: RationalQuadratic(bins=bins, bound=bound), actnorm, lu, memory,
                        steps=True)


@register_model(input_size=(2,), paper="GIN (Sorrenson et al. 2020)")
def gin(dim: int = 2, num_layers: int = 8, hidden: int = 64, depth: int = 2,
        clamp: float = 2.0, memory: MemoryMode | str = MemoryMode.REVERSIBLE) -> VectorFlow:
    """GIN (Sorrenson et al. 2020): volume-preserving affine couplings on vectors.

    ``num_layers`` affine half couplings with alternating masks whose log-scales sum to zero
    per sample (:class:`revtrain.VolumePreservingAffine`): the flow's log-det is exactly 0.
    No ActNorm (it would change the volume); standard normal prior (GIN's class-conditional
    Gaussian mixture is left to the caller's prior).
    """
    return _vector_flow(dim, num_layers, hidden, depth, lambda: VolumePreservingAffine(clamp),
                        False, False, memory)


@register_model(input_size=(3, 32, 32), paper="RealNVP with spline couplings (Durkan et al. 2019)")
def spline_realnvp(in_channels: int = 3, image_size: int = 32, levels: int = 3, hidden: int = 64,
                   dim: int | None = None, num_layers: int = 8, depth: int = 2, bins: int = 8,
                   bound: float = 3.0, alpha: float = 0.05, actnorm: bool = True,
                   split_prior: bool = False,
                   memory: MemoryMode | str = MemoryMode.REVERSIBLE) -> FlowModel:
    """RealNVP's architecture with rational-quadratic spline couplings.

    ``realnvp(transform="spline")``: images (multi-scale, logit preprocessing) or, with
    ``dim``, vectors; ``bins`` bins on ``[-bound, bound]``; the other arguments as in
    ``realnvp``.
    """
    return realnvp(in_channels=in_channels, image_size=image_size, levels=levels, hidden=hidden,
                   dim=dim, num_layers=num_layers, depth=depth, alpha=alpha, actnorm=actnorm,
                   split_prior=split_prior, memory=memory, transform="spline", bins=bins,
                   bound=bound)


@register_model(input_size=(3, 32, 32), paper="Glow with spline couplings (Durkan et al. 2019)")
def spline_glow(in_channels: int = 3, image_size: int = 32, levels: int = 3, steps: int = 32,
                hidden: int = 512, bins: int = 8, bound: float = 3.0, lu: bool = True,
                split_prior: bool = True, preprocess: str = "logit", alpha: float = 0.05,
                memory: MemoryMode | str = MemoryMode.REVERSIBLE) -> MultiScaleFlow:
    """Glow with rational-quadratic spline couplings and the logit preprocessing.

    ``glow(transform="spline", preprocess="logit")``: per level a squeeze, ``K`` x (ActNorm,
    LU 1x1 convolution, spline coupling) and a learned split prior; ``bins`` bins on
    ``[-bound, bound]``; the other arguments as in ``glow``.
    """
    return glow(in_channels=in_channels, image_size=image_size, levels=levels, steps=steps,
                hidden=hidden, lu=lu, split_prior=split_prior, memory=memory,
                preprocess=preprocess, alpha=alpha, transform="spline", bins=bins, bound=bound)


@register_model(input_size=(784,), paper="NICE (Dinh et al. 2014)")
def nice(dim: int = 784, num_layers: int = 4, hidden: int = 1000, depth: int = 5,
         prior: str = "logistic", memory: MemoryMode | str = MemoryMode.REVERSIBLE) -> VectorFlow:
    """NICE (Dinh et al. 2014): additive couplings with alternating masks, diagonal scaling.

    ``num_layers`` additive half couplings (even / odd entries alternating), MLP sub-networks
    with ``depth`` hidden layers of width ``hidden``, a final :class:`DiagonalScaling`, and a
    ``"logistic"`` (paper) or ``"normal"`` prior.
    """
    if dim < 2:
        raise ValueError(f"nice: dim must be at least 2 to split, got {dim}")
    layers: list[nn.Module] = []
    for i in range(num_layers):
        mask = CheckerboardMask(i % 2)
        n1 = len(range(mask.parity, dim, 2))
        layers.append(_coupling(lambda k, n1=n1: MLP(dim - n1, k * n1, hidden, depth), mask,
                                Additive()))
    layers.append(DiagonalScaling(dim))
    return VectorFlow(dim, layers, make_prior(prior), memory)

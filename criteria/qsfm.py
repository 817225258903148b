"""QSFM: channel redundancy from the quantified similarity of feature maps (needs data).

Wang et al., "QSFM: Model Pruning Based on Quantified Similarity Between Feature Maps for
AI on Edge", arXiv 2105.06052.

For every target conv, the calibration images are run through the model (eval mode, no
gradients) and the conv's output channels are compared pairwise, image by image: each
channel map is min-max normalised to [0, 1], then the pair's PSNR (default) or SSIM is
computed and added to a running ``C x C`` sum. The average over images is the layer's
similarity matrix; a greedy pair elimination
(:func:`prunebench.criteria._greedy.greedy_redundancy_scores` on ``-similarity``) ranks the
channels, the more redundant member of the most similar pair scoring lowest.

With ``compensation`` on, :meth:`QSFM.compensate` folds every removed channel into its most
similar kept channel (its *twin*): the consumers' input weights get
``W[:, twin] += W[:, removed]`` through :func:`prunebench.pipeline.compensation.fold_into_consumers`.

Memory per layer: the ``C x C`` float64 running sum, plus one batch of the conv's output
(which the forward pass materialises anyway) and a float64 working copy of a chunk of it.
Nothing grows with the number of calibration images.

What was reconstructed (the paper's method section could not be consulted) is listed in
docs/criteria/qsfm.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import Tensor, nn

from prunebench.criteria._greedy import greedy_redundancy_scores
from prunebench.errors import ConfigError, suggest
from prunebench.graph import build_graph
from prunebench.pipeline.compensation import fold_into_consumers
from prunebench.protocols import Calibration, ScoreCriterion

SIMILARITIES = ("psnr", "ssim")

# SSIM stabilisers for a data range of 1 (maps are min-max normalised): (0.01 L)^2, (0.03 L)^2.
_SSIM_C1 = 0.01**2
_SSIM_C2 = 0.03**2
# Float64 elements of one [chunk, C, max(C, H*W)] working block (2 MiB): small blocks stay in
# cache, which measured several times faster than large ones for wide layers.
_CHUNK_ELEMENTS = 2**18

__all__ = ["QSFM", "SIMILARITIES", "SimilarityAccumulator", "pairwise_map_similarity"]


def pairwise_map_similarity(fmaps: Tensor, measure: str = "psnr", psnr_cap: float = 100.0) -> Tensor:
    """Per-image pairwise similarity of the channel maps of ``fmaps`` ``[B, C, H, W]``.

    Returns ``[B, C, C]`` float64. Each map is min-max normalised to [0, 1] (a constant map
    becomes all zeros; a map holding a NaN gives NaN similarities). ``"psnr"``:
    ``10 log10(1 / MSE)``, capped at ``psnr_cap`` dB (identical maps reach the cap). ``"ssim"``:
    SSIM from the global statistics of the two maps (one window covering the whole map) with
    ``C1 = 0.01^2``, ``C2 = 0.03^2``; identical maps give 1.
    Everything comes from one Gram matrix per image, so all pairs cost one batched matmul.
    The map norms come from a separate sum of squares, so identical maps land within
    rounding of MSE 0 and are clamped to the cap.
    """
    if fmaps.dim() != 4:
        raise ValueError(f"expected feature maps [B, C, H, W], got shape {tuple(fmaps.shape)}")
    x = fmaps.detach().flatten(2).to(torch.float64)  # [B, C, P]
    p = x.shape[-1]
    lo = x.amin(dim=-1, keepdim=True)
    span = x.amax(dim=-1, keepdim=True) - lo
    # span != 0 (not > 0): a map holding a NaN has a NaN span and stays NaN, so that callers see it.
    xn = torch.where(span != 0, (x - lo) / span.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))
    xt = xn.transpose(1, 2)
    sq = (xn * xn).sum(dim=-1)  # [B, C]
    # The [B, C, C] blocks are built with fused/in-place ops: this elementwise work, not the
    # matmul, dominates for wide layers with small maps.
    if measure == "psnr":
        # MSE_ij = (|x_i|^2 + |x_j|^2 - 2 x_i.x_j) / P
        out = torch.baddbmm(sq[:, :, None] + sq[:, None, :], xn, xt, alpha=-2.0)
        return out.div_(p).clamp_(min=10.0 ** (-psnr_cap / 10.0)).log10_().mul_(-10.0)
    if measure == "ssim":
        mu = xn.mean(dim=-1)  # [B, C]
        var = (sq / p - mu * mu).clamp_min(0.0)
        mm = mu[:, :, None] * mu[:, None, :]
        cov = torch.baddbmm(mm, xn, xt, beta=-1.0, alpha=1.0 / p)  # x_i.x_j / P - mu_i mu_j
        num = cov.mul_(2.0).add_(_SSIM_C2).mul_(mm.mul_(2.0).add_(_SSIM_C1))
        m2 = mu * mu
        den = (m2[:, :, None] + m2[:, None, :] + _SSIM_C1).mul_(var[:, :, None] + var[:, None, :] + _SSIM_C2)
        return num.div_(den)
    raise ConfigError(f"unknown qsfm similarity {measure!r}.{suggest(measure, SIMILARITIES)}")


class SimilarityAccumulator:
    """Running sum over images of one layer's pairwise channel similarity.

    State: a ``[C, C]`` float64 sum and an image count, whatever the number of images.
    :meth:`update` processes a batch in chunks of images so that the float64 working copy
    stays small (about 2 MiB per block, at least one image).
    """

    def __init__(self, channels: int, measure: str = "psnr", psnr_cap: float = 100.0, device=None) -> None:
        self.channels = int(channels)
        self.measure = measure
        self.psnr_cap = float(psnr_cap)
        self.total = torch.zeros(self.channels, self.channels, dtype=torch.float64, device=device)
        self.count = 0

    def update(self, fmaps: Tensor) -> None:
        if fmaps.dim() != 4 or fmaps.shape[1] != self.channels:
            raise ValueError(
                f"expected [B, {self.channels}, H, W] feature maps, got shape {tuple(fmaps.shape)}"
            )
        b, c, h, w = fmaps.shape
        per_image = c * max(c, h * w)
        chunk = max(1, _CHUNK_ELEMENTS // max(1, per_image))
        if self.total.device != fmaps.device:
            self.total = self.total.to(fmaps.device)
        for start in range(0, b, chunk):
            sim = pairwise_map_similarity(fmaps[start : start + chunk], self.measure, self.psnr_cap)
            self.total += sim.sum(dim=0)
        self.count += int(b)

    def mean(self) -> Tensor:
        if self.count == 0:
            raise ValueError("no feature maps were seen")
        return self.total / self.count

    @property
    def nbytes(self) -> int:
        """Bytes of state kept between batches."""
        return self.total.numel() * self.total.element_size()


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


class QSFM(ScoreCriterion):
    """Channel redundancy from pairwise PSNR/SSIM of feature maps, with optional twin folding."""

    name = "qsfm"
    needs_data = True
    summary = "QSFM: prune the more redundant of the most similar feature-map pairs (PSNR/SSIM), fold it into its twin"
    reference = (
        "Wang et al., 'QSFM: Model Pruning Based on Quantified Similarity Between Feature Maps "
        "for AI on Edge', arXiv 2105.06052"
    )

    @dataclass(frozen=True)
    class Params:
        #: Pairwise feature-map similarity: "psnr" (default) or "ssim".
        similarity: str = "psnr"
        #: Fold each removed channel into its most similar kept channel before surgery.
        compensation: bool = True
        #: PSNR ceiling in dB (identical maps have infinite PSNR).
        psnr_cap: float = 100.0

        def __post_init__(self) -> None:
            if self.similarity not in SIMILARITIES:
                raise ConfigError(
                    f"qsfm: unknown similarity {self.similarity!r}."
                    f"{suggest(str(self.similarity), SIMILARITIES)} Available: {', '.join(SIMILARITIES)}"
                )
            if not isinstance(self.compensation, bool):
                raise ConfigError(f"qsfm: compensation must be true or false, got {self.compensation!r}")
            cap = self.psnr_cap
            if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not (0 < cap < math.inf):
                raise ConfigError(f"qsfm: psnr_cap must be a positive number of dB, got {cap!r}")

    def __init__(self, params=None, seed: int = 0) -> None:
        super().__init__(params, seed=seed)
        #: ``{conv name: [C, C] mean similarity}`` from the last :meth:`scores` call (CPU).
        self.similarity_matrices: dict[str, Tensor] = {}
        #: ``{conv name: [R, 2] (removed, twin)}`` from the last :meth:`compensate` call.
        self.twins: dict[str, Tensor] = {}

    # -- data --------------------------------------------------------------------------
    def _check_calibration(self, calibration: Calibration | None) -> Calibration:
        if calibration is None:
            raise ConfigError(
                "qsfm needs calibration data (feature maps of training images) but none was given"
            )
        n, bs = len(calibration), int(calibration.batch_size)
        if n < bs:
            raise ConfigError(
                f"qsfm needs at least one full calibration batch: {n} image(s) were given, "
                f"{bs} are needed (batch size {bs}); give more calibration images or a smaller batch size"
            )
        return calibration

    def _convs(self, model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Conv2d]:
        modules = dict(model.named_modules())
        convs: dict[str, nn.Conv2d] = {}
        for name in layers:
            m = modules.get(name)
            if m is None:
                raise ConfigError(f"qsfm: the model has no module {name!r}.{suggest(name, modules)}")
            if not isinstance(m, nn.Conv2d):
                raise ConfigError(f"qsfm scores Conv2d layers; {name!r} is a {type(m).__name__}")
            convs[name] = m
        return convs

    @torch.no_grad()
    def similarities(
        self, model: nn.Module, layers: Sequence[str], calibration: Calibration | None
    ) -> dict[str, Tensor]:
        """``{conv name: [C, C]}`` mean pairwise similarity of the conv's output channel maps."""
        calibration = self._check_calibration(calibration)
        convs = self._convs(model, layers)
        p = self.params
        accs = {
            name: SimilarityAccumulator(conv.out_channels, p.similarity, p.psnr_cap)
            for name, conv in convs.items()
        }

        def hook_for(name: str):
            def hook(module: nn.Module, inputs, output: Tensor) -> None:
                accs[name].update(output)

            return hook

        handles = [conv.register_forward_hook(hook_for(name)) for name, conv in convs.items()]
        was_training = model.training
        device = _model_device(model)
        model.eval()
        try:
            for images, _ in calibration.batches():
                model(images.to(device))
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        out: dict[str, Tensor] = {}
        for name, acc in accs.items():
            if acc.count == 0:
                raise ConfigError(f"qsfm: layer {name!r} was never called in the forward pass")
            sim = acc.mean().cpu()
            if not torch.isfinite(sim).all():
                raise ConfigError(f"qsfm: non-finite feature maps in layer {name!r} (NaN/inf activations)")
            out[name] = sim
        return out

    # -- contract ----------------------------------------------------------------------
    def scores(
        self, model: nn.Module, layers: Sequence[str], calibration: Calibration | None
    ) -> dict[str, Tensor]:
        sims = self.similarities(model, layers, calibration)
        self.similarity_matrices = dict(sims)
        return {name: greedy_redundancy_scores(-s).to(torch.float32) for name, s in sims.items()}

    def compensate(
        self, model: nn.Module, removal: Mapping[str, Tensor], calibration: Calibration | None
    ) -> None:
        """Fold each removed channel into its most similar kept channel (``W[:, twin] += W[:, r]``).

        Twins are chosen against the channels that actually stay, from the similarity cached
        by the last :meth:`scores` call (recomputed when missing or when the layer's width
        changed since). Exact when the path to the consumer is linear and the two maps are
        equal; a first-order approximation through BatchNorm/ReLU.

        Convs whose output channels are coupled (a residual sum, a conv feeding a depthwise
        conv) lose the same channels and feed the same consumers: they are folded once, with
        twins chosen from the mean of their similarity matrices, so that no consumer column
        is added twice.
        """
        self.twins = {}
        if not self.params.compensation:
            return
        if calibration is None:
            raise ConfigError("qsfm compensation needs calibration data (example inputs) but none was given")
        removal = {k: v for k, v in removal.items() if len(v)}
        if not removal:
            return
        convs = self._convs(model, list(removal))
        removed_of: dict[str, Tensor] = {}
        for name, idx in removal.items():
            c = convs[name].out_channels
            removed = torch.unique(torch.as_tensor(idx, dtype=torch.long).flatten().cpu())
            if int(removed.min()) < 0 or int(removed.max()) >= c:
                raise ConfigError(f"qsfm: channel indices to remove from {name!r} must lie in [0, {c})")
            removed_of[name] = removed
        stale = [
            n
            for n, c in convs.items()
            if n not in self.similarity_matrices or self.similarity_matrices[n].shape[0] != c.out_channels
        ]
        if stale:
            self.similarity_matrices.update(self.similarities(model, stale, calibration))

        example = calibration.images[:1].to(_model_device(model))
        # torch-pruning traces the graph with autograd: build it with gradients enabled and in
        # eval mode (so that tracing leaves BatchNorm statistics alone).
        was_training = model.training
        model.eval()
        try:
            graph = build_graph(model, example)
        finally:
            model.train(was_training)

        folds: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        for unit in _coupled_units(graph, convs):
            rep = unit[0]
            c = convs[rep].out_channels
            removed = removed_of[rep]
            keep_mask = torch.ones(c, dtype=torch.bool)
            keep_mask[removed] = False
            kept = torch.nonzero(keep_mask).squeeze(1)
            if kept.numel() == 0:
                continue
            sims = [self.similarity_matrices[m] for m in unit if convs[m].out_channels == c]
            sim = torch.stack(sims).mean(dim=0)
            nearest = sim[removed][:, kept].argmax(dim=1)
            coeffs = torch.zeros(removed.numel(), kept.numel(), dtype=torch.float64)
            coeffs[torch.arange(removed.numel()), nearest] = 1.0
            folds[rep] = (removed, kept, coeffs)
            pairs = torch.stack([removed, kept[nearest]], dim=1)
            for m in unit:
                self.twins[m] = pairs
        if folds:
            fold_into_consumers(model, example, folds, graph=graph)


def _coupled_units(graph: tp.DependencyGraph, convs: Mapping[str, nn.Module]) -> list[list[str]]:
    """Partition ``convs`` into sets whose output channels torch-pruning removes together."""
    name_of = {id(m): n for n, m in convs.items()}
    seen: set[str] = set()
    units: list[list[str]] = []
    for name, conv in convs.items():
        if name in seen:
            continue
        members = [name]
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[0])
        for dep, _ in group:
            other = name_of.get(id(dep.target.module))
            if (
                other is not None
                and other not in seen
                and other not in members
                and getattr(dep.handler, "__name__", "") == "prune_out_channels"
            ):
                members.append(other)
        seen.update(members)
        units.append(members)
    return units

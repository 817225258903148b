"""QSFM: feature-map similarity, greedy ranking, twin compensation, memory, errors."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from torch import nn

import prunebench.criteria.qsfm as qsfm_mod
from prunebench.criteria.qsfm import (
    QSFM,
    SimilarityAccumulator,
    pairwise_map_similarity,
)
from prunebench.errors import ConfigError
from prunebench.protocols import Calibration, ScoreCriterion


def _calibration(n: int = 24, batch_size: int = 8, size: int = 8, seed: int = 0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    return Calibration(
        torch.randn(n, 3, size, size, generator=g), torch.zeros(n, dtype=torch.long), batch_size=batch_size
    )


class _ConvBnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class _MobileBlockNet(nn.Module):
    """MobileNetV2-style: stem, expand 1x1 -> depthwise 3x3 -> project 1x1, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.expand = nn.Conv2d(8, 16, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.project = nn.Conv2d(16, 8, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = nn.functional.relu6(self.bn1(self.expand(x)))
        y = nn.functional.relu6(self.bn2(self.depthwise(y)))
        x = x + self.bn3(self.project(y))
        return self.fc(x.mean((2, 3)))


def _conv_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


# ----------------------------------------------------------------------------- similarity
def test_plugin_metadata_and_defaults():
    assert issubclass(QSFM, ScoreCriterion)
    assert QSFM.name == "qsfm" and QSFM.needs_data is True
    assert QSFM.summary and "2105.06052" in QSFM.reference
    p = QSFM().params
    assert (p.similarity, p.compensation, p.psnr_cap) == ("psnr", True, 100.0)
    assert QSFM.from_kwargs(compensation="false", similarity="ssim").params.compensation is False


def test_identical_maps_reach_the_psnr_cap_and_are_the_most_similar():
    torch.manual_seed(0)
    x = torch.randn(5, 6, 7, 7)
    x[:, 4] = x[:, 1]
    x[:, 5] = 3.0 * x[:, 2] + 2.0  # positive affine copy: identical after min-max normalisation
    psnr = pairwise_map_similarity(x, "psnr", psnr_cap=100.0)
    assert torch.allclose(psnr[:, 1, 4], torch.full((5,), 100.0, dtype=torch.float64))
    assert torch.allclose(psnr[:, 2, 5], torch.full((5,), 100.0, dtype=torch.float64))
    assert torch.allclose(psnr.diagonal(dim1=1, dim2=2), torch.full((5, 6), 100.0, dtype=torch.float64))
    assert psnr.max() <= 100.0
    others = psnr.clone()
    for i, j in [(1, 4), (4, 1), (2, 5), (5, 2)]:
        others[:, i, j] = 0
    others[:, range(6), range(6)] = 0
    assert others.max() < 60.0
    ssim = pairwise_map_similarity(x, "ssim")
    assert torch.allclose(ssim[:, 1, 4], torch.ones(5, dtype=torch.float64))
    assert (ssim <= 1.0 + 1e-12).all()


def test_psnr_and_ssim_match_direct_formulas():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 5, 5).double()
    psnr = pairwise_map_similarity(x, "psnr")
    ssim = pairwise_map_similarity(x, "ssim")
    flat = x.flatten(2)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    xn = (flat - lo) / (hi - lo)
    c1, c2 = 0.01**2, 0.03**2
    for b in range(2):
        for i in range(3):
            for j in range(3):
                a, c = xn[b, i], xn[b, j]
                ma, mc = a.mean(), c.mean()
                cov = ((a - ma) * (c - mc)).mean()
                ref = ((2 * ma * mc + c1) * (2 * cov + c2)) / (
                    (ma**2 + mc**2 + c1) * (a.var(unbiased=False) + c.var(unbiased=False) + c2)
                )
                assert float(ssim[b, i, j]) == pytest.approx(float(ref), rel=1e-9)
                if i != j:
                    mse = ((a - c) ** 2).mean()
                    assert float(psnr[b, i, j]) == pytest.approx(float(10 * torch.log10(1 / mse)), rel=1e-9)


@pytest.mark.parametrize("similarity", ["psnr", "ssim"])
def test_duplicated_filter_is_pruned_first(similarity):
    torch.manual_seed(0)
    model = _ConvBnNet()
    with torch.no_grad():
        model.conv1.weight[5] = model.conv1.weight[2]
        model.conv1.bias[5] = model.conv1.bias[2]
        model.conv2.weight[3] = model.conv2.weight[0]
        model.conv2.bias[3] = model.conv2.bias[0]
    s = QSFM.from_kwargs(similarity=similarity).scores(model, ["conv1", "conv2"], _calibration())
    assert int(torch.argmin(s["conv1"])) in (2, 5)
    assert int(torch.argmin(s["conv2"])) in (0, 3)


def test_scores_shapes_for_every_conv_incl_depthwise_and_model_untouched():
    torch.manual_seed(0)
    model = _MobileBlockNet()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = _conv_names(model)
    for similarity in ("psnr", "ssim"):
        s = QSFM.from_kwargs(similarity=similarity).scores(model, names, _calibration())
        modules = dict(model.named_modules())
        assert set(s) == set(names)
        for name in names:
            n = modules[name].out_channels
            assert s[name].shape == (n,)
            assert sorted(s[name].tolist()) == list(range(n))
    assert model.training  # mode restored
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BN running stats untouched too


# ----------------------------------------------------------------------------- memory
def test_running_state_does_not_grow_with_images():
    torch.manual_seed(0)
    acc = SimilarityAccumulator(6, "psnr")
    batches = [torch.randn(4, 6, 5, 5) for _ in range(10)]
    acc.update(batches[0])
    size, attrs = acc.nbytes, set(vars(acc))
    for b in batches[1:]:
        acc.update(b)
    assert acc.nbytes == size == 6 * 6 * 8
    assert set(vars(acc)) == attrs
    assert not any(isinstance(v, (list, dict, tuple)) for v in vars(acc).values())
    assert acc.count == 40
    expected = torch.cat([pairwise_map_similarity(b) for b in batches]).mean(0)
    assert torch.allclose(acc.mean(), expected)


def test_chunking_over_images_gives_the_same_result(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(9, 5, 4, 4)
    full = SimilarityAccumulator(5, "ssim")
    full.update(x)
    monkeypatch.setattr(qsfm_mod, "_CHUNK_ELEMENTS", 5 * 16 * 2)  # two images per chunk
    chunked = SimilarityAccumulator(5, "ssim")
    chunked.update(x)
    assert torch.allclose(full.mean(), chunked.mean())


def test_scores_keep_only_square_state_per_layer():
    torch.manual_seed(0)
    model = _ConvBnNet()
    q = QSFM()
    q.scores(model, ["conv1", "conv2"], _calibration(n=16))
    small = {k: v.shape for k, v in q.similarity_matrices.items()}
    q.scores(model, ["conv1", "conv2"], _calibration(n=64))
    assert (
        {k: v.shape for k, v in q.similarity_matrices.items()}
        == small
        == {
            "conv1": torch.Size([8, 8]),
            "conv2": torch.Size([6, 6]),
        }
    )


# ----------------------------------------------------------------------------- compensation
def _linear_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1))
    with torch.no_grad():  # channel 4 duplicates channel 1
        model[0].weight[4] = model[0].weight[1]
        model[0].bias[4] = model[0].bias[1]
    return model


def _remove_channel(model: nn.Sequential, r: int) -> nn.Sequential:
    keep = [c for c in range(model[0].out_channels) if c != r]
    out = nn.Sequential(nn.Conv2d(3, len(keep), 3, padding=1), nn.Conv2d(len(keep), 4, 3, padding=1))
    with torch.no_grad():
        out[0].weight.copy_(model[0].weight[keep])
        out[0].bias.copy_(model[0].bias[keep])
        out[1].weight.copy_(model[1].weight[:, keep])
        out[1].bias.copy_(model[1].bias)
    return out


@pytest.mark.parametrize("compensation", [True, False])
def test_folding_a_duplicate_channel_keeps_the_output(compensation):
    model = _linear_net()
    cal = _calibration()
    q = QSFM.from_kwargs(compensation=compensation)
    s = q.scores(model, ["0"], cal)
    r = int(torch.argmin(s["0"]))
    assert r in (1, 4)
    with torch.no_grad():
        before = model(cal.images)
    q.compensate(model, {"0": torch.tensor([r])}, cal)
    with torch.no_grad():
        after = _remove_channel(model, r)(cal.images)
    err = float((after - before).abs().max())
    if compensation:
        assert q.twins["0"].tolist() == [[r, 5 - r]]
        assert err < 1e-4
    else:
        assert q.twins == {}
        assert err > 1e-2


def test_twins_are_chosen_among_kept_channels():
    model = _linear_net()
    cal = _calibration()
    q = QSFM()
    q.scores(model, ["0"], cal)
    q.compensate(model, {"0": torch.tensor([1, 4])}, cal)  # both duplicates go
    twins = q.twins["0"]
    assert twins[:, 0].tolist() == [1, 4]
    assert not set(twins[:, 1].tolist()) & {1, 4}


def test_compensate_recomputes_similarity_when_scores_were_not_called():
    model = _linear_net()
    cal = _calibration()
    q = QSFM()
    q.compensate(model, {"0": torch.tensor([4])}, cal)
    assert q.twins["0"].tolist() == [[4, 1]]


def test_compensate_on_depthwise_separable_block():
    torch.manual_seed(0)
    model = _MobileBlockNet().eval()
    cal = _calibration()
    q = QSFM()
    names = _conv_names(model)
    s = q.scores(model, names, cal)
    # as the harness plans it: coupled convs (expand + depthwise; stem + project through the
    # residual sum) lose the same channels
    inner = torch.argsort(s["expand"] + s["depthwise"])[:3]
    outer = torch.argsort(s["stem"] + s["project"])[:2]
    removal = {"expand": inner, "depthwise": inner, "stem": outer, "project": outer}
    before = {n: model.get_submodule(n).weight.detach().clone() for n in ("expand", "depthwise", "project", "fc")}
    q.compensate(model, removal, cal)
    assert set(q.twins) == set(removal)
    assert torch.equal(q.twins["expand"], q.twins["depthwise"])
    assert torch.equal(q.twins["stem"], q.twins["project"])
    for unit, idx in (("expand", inner), ("stem", outer)):
        twins = q.twins[unit]
        assert sorted(twins[:, 0].tolist()) == sorted(idx.tolist())
        assert not set(twins[:, 1].tolist()) & set(idx.tolist())  # twins are kept channels

    def folded(w: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        out = w.clone()
        for r, k in pairs.tolist():
            out[:, k] += w[:, r]
        return out

    # the depthwise conv's outputs feed the (dense) project conv: each removed input column is
    # added once to its twin's, and nothing else moves
    torch.testing.assert_close(model.project.weight, folded(before["project"], q.twins["depthwise"]))
    # the residual stream (stem + project) feeds the expand conv and the classifier
    torch.testing.assert_close(model.expand.weight, folded(before["expand"], q.twins["stem"]))
    torch.testing.assert_close(model.fc.weight, folded(before["fc"], q.twins["stem"]))
    assert torch.equal(model.depthwise.weight, before["depthwise"])  # not linear in the channel mix


def _plant_depthwise_twin(model: _MobileBlockNet, src: int, dup: int) -> None:
    """Channel ``dup`` of the expand -> depthwise path computes exactly what channel ``src`` does."""
    with torch.no_grad():
        model.expand.weight[dup] = model.expand.weight[src]
        model.depthwise.weight[dup] = model.depthwise.weight[src]
        for bn in (model.bn1, model.bn2):
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                t[dup] = t[src]


@pytest.mark.parametrize("compensation", [True, False])
def test_removing_a_planted_depthwise_twin_keeps_the_output(compensation):
    """A duplicate expand/depthwise channel, removed from both convs and folded into its twin:
    the block's output is unchanged (as for the plain conv pair above)."""
    torch.manual_seed(3)
    model = _MobileBlockNet().eval()
    for bn in (model.bn0, model.bn1, model.bn2, model.bn3):
        with torch.no_grad():
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    src, dup = 3, 11
    _plant_depthwise_twin(model, src, dup)
    cal = _calibration()
    q = QSFM.from_kwargs(compensation=compensation)
    s = q.scores(model, ["expand", "depthwise"], cal)
    assert int(torch.argmin(s["expand"] + s["depthwise"])) in (src, dup)
    with torch.no_grad():
        before = model(cal.images)
    q.compensate(model, {"expand": torch.tensor([dup]), "depthwise": torch.tensor([dup])}, cal)
    with torch.no_grad():
        model.project.weight[:, dup] = 0.0  # the channel is gone: project is its only consumer
        after = model(cal.images)
    err = float((after - before).abs().max())
    if compensation:
        assert q.twins["expand"].tolist() == q.twins["depthwise"].tolist() == [[dup, src]]
        assert err < 1e-5  # folded once: twice would add project's column a second time
    else:
        assert q.twins == {} and err > 1e-3


class _Residual(nn.Module):
    """Linear residual pair: c(a(x) + b(x)); a and b are coupled through the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        return self.c(self.a(x) + self.b(x))


def test_coupled_convs_are_folded_once():
    torch.manual_seed(0)
    model = _Residual()
    with torch.no_grad():  # channel 4 duplicates channel 1 in both branches, hence in the sum
        for conv in (model.a, model.b):
            conv.weight[4] = conv.weight[1]
            conv.bias[4] = conv.bias[1]
    cal = _calibration()
    q = QSFM()
    q.scores(model, ["a", "b"], cal)
    with torch.no_grad():
        before = model(cal.images)
    q.compensate(model, {"a": torch.tensor([4]), "b": torch.tensor([4])}, cal)
    keep = [0, 1, 2, 3, 5]
    with torch.no_grad():
        a = nn.functional.conv2d(cal.images, model.a.weight[keep], model.a.bias[keep], padding=1)
        b = nn.functional.conv2d(cal.images, model.b.weight[keep], model.b.bias[keep])
        after = nn.functional.conv2d(a + b, model.c.weight[:, keep], model.c.bias, padding=1)
    assert q.twins["a"].tolist() == q.twins["b"].tolist() == [[4, 1]]
    assert float((after - before).abs().max()) < 1e-4  # added twice, it would be off by W_c[:, 4]


# ----------------------------------------------------------------------------- errors
def test_unknown_similarity_is_a_config_error_with_suggestion():
    with pytest.raises(ConfigError, match="Did you mean 'psnr'"):
        QSFM.from_kwargs(similarity="pnsr")
    with pytest.raises(ConfigError, match="psnr_cap"):
        QSFM.from_kwargs(psnr_cap=0.0)


def test_missing_calibration_is_a_config_error():
    model = _ConvBnNet()
    with pytest.raises(ConfigError, match="needs calibration data"):
        QSFM().scores(model, ["conv1"], None)
    with pytest.raises(ConfigError, match="calibration"):
        QSFM().compensate(model, {"conv1": torch.tensor([0])}, None)


def test_calibration_smaller_than_a_batch_is_a_config_error():
    model = _ConvBnNet()
    with pytest.raises(ConfigError) as exc:
        QSFM().scores(model, ["conv1"], _calibration(n=5, batch_size=8))
    assert "5 image(s) were given, 8 are needed" in str(exc.value)


def test_unknown_layer_is_a_config_error():
    with pytest.raises(ConfigError, match="no module"):
        QSFM().scores(_ConvBnNet(), ["conv3"], _calibration())


@pytest.mark.parametrize("params", [{}, {"similarity": "ssim", "compensation": False}])
def test_contract_through_the_harness(params):
    from prunebench.testing import check_criterion

    report = check_criterion(QSFM, params)
    assert report["criterion"] == "qsfm" and report["kind"] == "score"


# ----------------------------------------------------------------------------- the paper's headline claim


def _pretrained_resnet56(path):
    from prunebench import registry

    state = {}
    for key, value in torch.load(path, map_location="cpu", weights_only=True)["state_dict"].items():
        key = key.removeprefix("module.")
        state["fc." + key[len("linear."):] if key.startswith("linear.") else key] = value
    model = registry.architectures.get("resnet56").build(num_classes=10, in_channels=3)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    return model.eval()


@pytest.mark.slow
@pytest.mark.data
def test_one_shot_qsfm_on_the_converged_resnet56(real_data_root):
    """The paper: one-shot QSFM on a converged ResNet-56 at about 48% fewer MACs loses little
    accuracy. Measured here on the public checkpoint (ImageNet normalisation, cifar10-jpeg test
    images): the drop is large (docs/criteria/qsfm.md has the full-test-set number), but QSFM
    does keep far more accuracy than random channels at the same target."""
    import copy

    from prunebench import registry
    from prunebench.datasets import data_root
    from prunebench.pipeline.compress import compress
    from prunebench.pipeline.meter import Meter
    from prunebench.protocols import CompressionContext, EpochLedger, Target

    ckpt = real_data_root / "pretrained" / "resnet56-4bfd9763.th"
    if not ckpt.is_file():
        pytest.skip(f"needs the pretrained ResNet-56 at {ckpt}")
    splits = registry.datasets.get("cifar10-jpeg").load(data_root(real_data_root))
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)

    def norm(x):
        return (x.float() / 255 - mean) / std

    g = torch.Generator().manual_seed(0)
    test = torch.randperm(len(splits.test_x), generator=g)[:1000]
    cal = torch.randperm(len(splits.train_x), generator=g)[:256]
    calibration = Calibration(norm(splits.train_x[cal]), splits.train_y[cal], batch_size=128)

    @torch.no_grad()
    def top1(model):
        return float((model.eval()(norm(splits.test_x[test])).argmax(1) == splits.test_y[test]).float().mean())

    baseline = _pretrained_resnet56(ckpt)
    arch = registry.architectures.get("resnet56")
    example = torch.zeros(1, 3, 32, 32)
    acc = {"baseline": top1(baseline)}
    for name in ("qsfm", "random"):
        model = copy.deepcopy(baseline)
        target = Target("macs", 0.48, 0.01)
        meter = Meter(baseline, example, target)
        ctx = CompressionContext(
            example_inputs=example, calibration=calibration, target=target, device=torch.device("cpu"), seed=0,
            prunable=arch.prunable(model), protected=["fc"], ledger=EpochLedger(0.0), reduction=meter.reduction,
            reduction_of=lambda kept, m=model, mt=meter: mt.reduction_of(m, kept), train=lambda *a, **k: None,
            log=lambda msg: None,
        )
        result = compress(registry.criteria.get(name).from_kwargs(), model, ctx, meter)
        assert abs(result.achieved - 0.48) <= 0.01
        acc[name] = top1(model)
    print(f"one-shot top-1 at -48% MACs on 1000 cifar10-jpeg test images: {acc}")
    assert acc["baseline"] > 0.75
    assert acc["qsfm"] > acc["random"] + 0.05


def test_feature_maps_of_the_wrong_rank_are_named_exactly():
    with pytest.raises(ValueError, match=r"^expected feature maps \[B, C, H, W\], got shape \(2, 3, 4\)$"):
        pairwise_map_similarity(torch.randn(2, 3, 4))


@pytest.mark.parametrize("similarity", ["psnr", "ssim"])
def test_a_nan_activation_is_a_config_error_not_a_constant_map(similarity):
    """One NaN pixel must not turn its map into a constant (all-zero) map silently."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    x[1, 0, 2, 2] = float("nan")
    sim = pairwise_map_similarity(x, similarity)
    assert torch.isfinite(sim[0]).all()
    assert sim[1, 0].isnan().all() and sim[1, :, 0].isnan().all()
    model = _ConvBnNet()
    with torch.no_grad():
        model.conv1.bias[2] = float("nan")
    with pytest.raises(ConfigError, match="non-finite feature maps in layer 'conv1'"):
        QSFM.from_kwargs(similarity=similarity).scores(model, ["conv1"], _calibration())


# ----------------------------------------------------------------------------- edge cases and exact errors
def _numpy_psnr(maps: np.ndarray, cap: float = 100.0) -> np.ndarray:
    """Brute-force mean pairwise PSNR of ``maps`` ``[B, C, H, W]`` (min-max normalised maps)."""
    b, c = maps.shape[:2]
    flat = maps.reshape(b, c, -1).astype(np.float64)
    out = np.zeros((c, c))
    for img in flat:
        for i in range(c):
            for j in range(c):
                a, d = img[i], img[j]
                a = (a - a.min()) / (a.max() - a.min()) if a.max() > a.min() else np.zeros_like(a)
                d = (d - d.min()) / (d.max() - d.min()) if d.max() > d.min() else np.zeros_like(d)
                mse = np.mean((a - d) ** 2)
                out[i, j] += cap if mse <= 10.0 ** (-cap / 10.0) else 10.0 * np.log10(1.0 / mse)
    return out / b


def test_accumulator_defaults_to_psnr_and_takes_one_tall_image():
    """One image whose maps are taller than the layer is wide (H / W > C), default measure."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 16, 2)
    acc = SimilarityAccumulator(2)
    acc.update(x)
    assert acc.count == 1
    np.testing.assert_allclose(acc.mean().numpy(), _numpy_psnr(x.numpy()), rtol=1e-9)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (0, 0, 0, 0)])
def test_an_empty_batch_leaves_the_accumulator_unchanged(shape):
    acc = SimilarityAccumulator(shape[1])
    acc.update(torch.zeros(shape))
    assert acc.count == 0 and torch.equal(acc.total, torch.zeros(shape[1], shape[1], dtype=torch.float64))


def test_the_running_sum_follows_the_device_of_the_maps():
    """QSFM builds its accumulators on the CPU; the maps come from the model's device."""
    acc = SimilarityAccumulator(4)
    acc.update(torch.empty(3, 4, 5, 5, device="meta"))
    mean = acc.mean()
    assert mean.device.type == "meta" and mean.shape == (4, 4) and mean.dtype == torch.float64


def test_one_calibration_image_in_one_full_batch_gives_that_images_similarity():
    torch.manual_seed(0)
    model = _ConvBnNet()
    cal = _calibration(n=1, batch_size=1)
    sims = QSFM().similarities(model, ["conv1"], cal)
    with torch.no_grad():
        maps = model.conv1(cal.images)
    np.testing.assert_allclose(sims["conv1"].numpy(), _numpy_psnr(maps.numpy()), rtol=1e-9)


def test_a_model_without_parameters_is_scored_on_the_cpu():
    """A conv whose weights are plain tensors (no parameters, no buffers in the model)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    weight = conv.weight.detach().clone()
    del conv.weight
    conv.weight = weight
    model = nn.Sequential(conv)
    assert not list(model.parameters()) and not list(model.buffers())
    cal = _calibration(n=2, batch_size=2)
    sims = QSFM().similarities(model, ["0"], cal)
    np.testing.assert_allclose(sims["0"].numpy(), _numpy_psnr(conv(cal.images).numpy()), rtol=1e-9)


def test_a_small_psnr_cap_is_valid_and_caps_every_pair():
    q = QSFM.from_kwargs(psnr_cap=0.5)
    sims = q.similarities(_ConvBnNet(), ["conv2"], _calibration(n=8))
    torch.testing.assert_close(sims["conv2"], torch.full((6, 6), 0.5, dtype=torch.float64), rtol=1e-12, atol=0)


def test_params_are_frozen_and_a_new_criterion_has_no_twins():
    q = QSFM()
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.params.psnr_cap = -1.0  # would bypass the validation
    assert q.twins == {} and q.similarity_matrices == {}


def test_compensate_recomputes_similarity_when_the_layer_width_changed():
    """Scores of a 6-wide layer are cached; the layer is then 8 wide, channel 7 a copy of 1."""
    cal = _calibration()
    q = QSFM()
    q.scores(_linear_net(), ["0"], cal)
    torch.manual_seed(5)
    wide = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1))
    with torch.no_grad():
        wide[0].weight[7] = wide[0].weight[1]
        wide[0].bias[7] = wide[0].bias[1]
    q.compensate(wide, {"0": torch.tensor([7])}, cal)
    assert q.twins["0"].tolist() == [[7, 1]]
    assert q.similarity_matrices["0"].shape == (8, 8)


def test_a_layer_losing_every_channel_is_not_folded_and_the_others_still_are():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)
    )
    with torch.no_grad():  # channel 4 of the middle conv duplicates its channel 1
        model[1].weight[4] = model[1].weight[1]
        model[1].bias[4] = model[1].bias[1]
    w1, w2 = model[1].weight.detach().clone(), model[2].weight.detach().clone()
    q = QSFM()
    q.compensate(model, {"0": torch.arange(6), "1": torch.tensor([4])}, _calibration())
    assert set(q.twins) == {"1"} and q.twins["1"].tolist() == [[4, 1]]
    assert torch.equal(model[1].weight, w1)  # the first conv's consumer is untouched
    expected = w2.clone()
    expected[:, 1] += w2[:, 4]
    torch.testing.assert_close(model[2].weight, expected)


def _never_called() -> nn.Module:
    model = _ConvBnNet()
    model.unused = nn.Conv2d(3, 2, 1)
    return model


def _nan_weights() -> nn.Module:
    model = _ConvBnNet()
    with torch.no_grad():
        model.conv1.weight[0] = float("nan")
    return model


_ERRORS = {
    "measure": (
        lambda: pairwise_map_similarity(torch.randn(1, 2, 3, 3), "pnsr"),
        ConfigError,
        "unknown qsfm similarity 'pnsr'. Did you mean 'psnr'?",
    ),
    "accumulator width": (
        lambda: SimilarityAccumulator(3).update(torch.randn(2, 4, 5, 5)),
        ValueError,
        "expected [B, 3, H, W] feature maps, got shape (2, 4, 5, 5)",
    ),
    "accumulator rank": (
        lambda: SimilarityAccumulator(3).update(torch.randn(2, 3, 5)),
        ValueError,
        "expected [B, 3, H, W] feature maps, got shape (2, 3, 5)",
    ),
    "accumulator empty": (lambda: SimilarityAccumulator(3).mean(), ValueError, "no feature maps were seen"),
    "similarity": (
        lambda: QSFM.from_kwargs(similarity="pnsr"),
        ConfigError,
        "qsfm: unknown similarity 'pnsr'. Did you mean 'psnr'? Available: psnr, ssim",
    ),
    "compensation": (
        lambda: QSFM.from_kwargs(compensation=1),
        ConfigError,
        "qsfm: compensation must be true or false, got 1",
    ),
    "cap zero": (
        lambda: QSFM.from_kwargs(psnr_cap=0.0),
        ConfigError,
        "qsfm: psnr_cap must be a positive number of dB, got 0.0",
    ),
    "cap inf": (
        lambda: QSFM.from_kwargs(psnr_cap="inf"),
        ConfigError,
        "qsfm: psnr_cap must be a positive number of dB, got inf",
    ),
    "cap bool": (
        lambda: QSFM.from_kwargs(psnr_cap=True),
        ConfigError,
        "qsfm: psnr_cap must be a positive number of dB, got True",
    ),
    "cap text": (
        lambda: QSFM.Params(psnr_cap="40"),
        ConfigError,
        "qsfm: psnr_cap must be a positive number of dB, got '40'",
    ),
    "no calibration": (
        lambda: QSFM().scores(_ConvBnNet(), ["conv1"], None),
        ConfigError,
        "qsfm needs calibration data (feature maps of training images) but none was given",
    ),
    "short calibration": (
        lambda: QSFM().scores(_ConvBnNet(), ["conv1"], _calibration(n=5, batch_size=8)),
        ConfigError,
        "qsfm needs at least one full calibration batch: 5 image(s) were given, 8 are needed "
        "(batch size 8); give more calibration images or a smaller batch size",
    ),
    "unknown layer": (
        lambda: QSFM().scores(_ConvBnNet(), ["conv3"], _calibration()),
        ConfigError,
        "qsfm: the model has no module 'conv3'. Did you mean 'conv2' or 'conv1'?",
    ),
    "not a conv": (
        lambda: QSFM().scores(_ConvBnNet(), ["bn1"], _calibration()),
        ConfigError,
        "qsfm scores Conv2d layers; 'bn1' is a BatchNorm2d",
    ),
    "never called": (
        lambda: QSFM().scores(_never_called(), ["conv1", "unused"], _calibration()),
        ConfigError,
        "qsfm: layer 'unused' was never called in the forward pass",
    ),
    "non-finite": (
        lambda: QSFM().scores(_nan_weights(), ["conv1"], _calibration()),
        ConfigError,
        "qsfm: non-finite feature maps in layer 'conv1' (NaN/inf activations)",
    ),
    "compensation without data": (
        lambda: QSFM().compensate(_linear_net(), {"0": torch.tensor([0])}, None),
        ConfigError,
        "qsfm compensation needs calibration data (example inputs) but none was given",
    ),
    "index too large": (
        lambda: QSFM().compensate(_linear_net(), {"0": torch.tensor([1, 6])}, _calibration()),
        ConfigError,
        "qsfm: channel indices to remove from '0' must lie in [0, 6)",
    ),
    "negative index": (
        lambda: QSFM().compensate(_linear_net(), {"0": torch.tensor([-1])}, _calibration()),
        ConfigError,
        "qsfm: channel indices to remove from '0' must lie in [0, 6)",
    ),
}


@pytest.mark.parametrize("case", list(_ERRORS))
def test_errors_are_exact(case):
    call, exc, message = _ERRORS[case]
    with pytest.raises(exc, match=f"^{re.escape(message)}$"):
        call()


def test_maps_whose_range_is_exactly_one_are_normalised_like_any_other():
    # min 0, max 1 (a binary map, say): the span is exactly 1 and the map is already in [0, 1].
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64)
    maps[:, 0] = (maps[:, 0] > 0.5).double()
    maps[:, 0, 0, 0], maps[:, 0, 0, 1] = 0.0, 1.0
    got = pairwise_map_similarity(maps, "psnr").mean(dim=0)
    np.testing.assert_allclose(got.numpy(), _numpy_psnr(maps.numpy()), rtol=1e-9)

"""Every built-in criterion's compressed model exports to ONNX and computes PyTorch's logits
(max |Δ logits| <= 1e-4, fp32): pruned widths, residual-scope models (PadShortcut) and the
factorised modules of ht2 and trp. A model that does not export is a one-line error naming
the module type."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunebench import registry
from prunebench.pipeline.compress import compress
from prunebench.pipeline.meter import Meter
from prunebench.protocols import Calibration, CompressionContext, EpochLedger, Target

pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install 'prunebench[onnx]')")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install 'prunebench[onnx]')")

from prunebench.latency import export as lat_export  # noqa: E402
from prunebench.latency import protocol as lat  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = [1, 3, 8, 8]


def compressed(criterion: str, scope: str | None = None, params: dict | None = None, arch_name: str = "resnet20",
               ratio: float = 0.4) -> nn.Module:
    """The criterion run for real on a small network with trained-looking BatchNorm statistics."""
    arch = registry.architectures.get(arch_name)
    torch.manual_seed(0)
    model = arch.build(num_classes=10, in_channels=3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.eval()
    images = torch.randn(32, *SHAPE[1:], generator=torch.Generator().manual_seed(1))
    example = images[:1]
    target = Target("macs", ratio, 0.02)
    meter = Meter(copy.deepcopy(model), example, target)
    ledger = EpochLedger(1.0)
    ctx = CompressionContext(
        example_inputs=example, calibration=Calibration(images, torch.zeros(32, dtype=torch.long), 32),
        target=target, device=torch.device("cpu"), seed=0, prunable=arch.prunable_layers(model, scope),
        protected=arch.protected(model), ledger=ledger, reduction=meter.reduction,
        reduction_of=lambda kept: meter.reduction_of(model, kept),
        train=lambda m, epochs, hooks=None, purpose="compress": ledger.draw(epochs, purpose), log=lambda msg: None,
    )
    result = compress(registry.criteria.get(criterion).from_kwargs(**(params or {})), model, ctx, meter)
    assert meter.within(result.achieved)
    return model.eval()


BUILT_IN = [
    ("l1", None, {}), ("random", None, {}), ("coring", None, {}), ("qsfm", None, {}),
    ("hbgs", None, {}), ("hbgs-b", None, {}), ("hbgts", None, {"lazy": True}), ("hbgts-b", None, {"lazy": True}),
    ("ht2", None, {}), ("trp", None, {}), ("trp", None, {"scheme": "spatial"}),
    # residual-scope models: residual channels pruned through PadShortcut
    ("l1", "all", {}), ("hbgs", "all", {}),
]


def test_the_list_covers_every_built_in_criterion():
    built_in = {name for name in registry.criteria.names() if registry.criteria.provider(name) is None}
    assert built_in <= {c for c, _, _ in BUILT_IN}


@pytest.mark.parametrize("criterion, scope, params", BUILT_IN,
                         ids=[f"{c}-{s or 'default'}{'-' + '-'.join(map(str, p.values())) if p else ''}"
                              for c, s, p in BUILT_IN])
def test_every_criterion_s_compressed_model_exports_with_pytorch_s_logits(criterion, scope, params):
    model = compressed(criterion, scope, params)
    if criterion in ("ht2", "trp"):
        assert any(type(m).__name__ == "Factorized" for m in model.modules())
    if scope == "all":
        assert model.conv1.out_channels < 16 or model.layer3[0].conv2.out_channels < 64  # residual channels went
    graph, check = lat_export.exported(model, SHAPE)
    assert check["passed"] and check["max_abs_logit_diff"] <= lat_export.EXPORT_TOLERANCE
    # the graph takes any batch (batch 64 is measured too)
    session = lat_export.ort_session(graph, 1)
    x = torch.randn(5, *SHAPE[1:])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert out.shape == (5, 10) and abs(out - model(x).numpy()).max() <= lat_export.EXPORT_TOLERANCE


def test_factorised_modules_of_mobilenetv2_export():
    model = compressed("ht2", arch_name="mobilenetv2")  # SVD of 1x1 convs beside depthwise convs
    assert any(type(m).__name__ == "Factorized" for m in model.modules())
    assert lat_export.exported(model, SHAPE)[1]["max_abs_logit_diff"] <= lat_export.EXPORT_TOLERANCE


class BesselGate(nn.Module):
    """An op the ONNX exporter has no translation for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.special.i0(x)


class HostRoundTrip(nn.Module):
    """Leaves the graph through NumPy: the exported graph holds a constant instead."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x.detach().numpy().copy()) * 2


def _with(module: nn.Module) -> nn.Module:
    model = registry.architectures.get("resnet20").build(num_classes=10, in_channels=3).eval()
    model.layer2[1].bn1 = nn.Sequential(model.layer2[1].bn1, module)
    return model


def test_a_module_that_does_not_export_is_one_line_naming_its_type():
    with pytest.raises(lat_export.ExportError) as info:
        lat_export.exported(_with(BesselGate()), SHAPE)
    message = str(info.value)
    assert "ONNX export failed in module BesselGate" in message and "\n" not in message


def test_a_module_whose_graph_computes_something_else_is_named():
    with pytest.raises(lat_export.ExportError, match="differs from PyTorch .* in module HostRoundTrip"):
        lat_export.exported(_with(HostRoundTrip()), SHAPE)


@pytest.mark.parametrize("criterion, scope", [("ht2", None), ("trp", None), ("l1", "all")])
def test_openvino_computes_pytorch_s_logits_from_the_checked_graph(criterion, scope):
    pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'prunebench[openvino]')")
    model = compressed(criterion, scope)
    graph, _ = lat_export.exported(model, SHAPE)
    assert lat_export.openvino_checked(model, graph, SHAPE)["max_abs_logit_diff"] <= lat_export.EXPORT_TOLERANCE


def test_a_results_directory_is_measured_on_the_onnx_runtimes_with_the_checks_recorded(tmp_path):
    from test_latency import FakeClock, add_run, fake_machine

    runtimes = [r for r in ("onnxruntime", "openvino") if lat_export.installed(r)]
    results = tmp_path / "results"
    results.mkdir()
    add_run(results, "digits-resnet20-ht2-a", criterion="ht2", kind="transform")
    options = lat.Options(runtimes=runtimes, settings=[(2, 1)], machine=fake_machine(),
                          clock=FakeClock(tick=0.001))
    outcomes = lat.run_latency(results, options)
    assert [o.status for o in outcomes] == ["measured"] * len(runtimes)
    for o in outcomes:
        assert o.record["onnx_check"]["max_abs_logit_diff"] <= lat_export.EXPORT_TOLERANCE
        assert o.record["runtime"] == o.setting.runtime and o.record["run_ids"] == ["digits-resnet20-ht2-a"]
        if o.setting.runtime == "openvino":
            assert o.record["openvino_check"]["max_abs_logit_diff"] <= lat_export.EXPORT_TOLERANCE


def _huge_logits() -> tuple[nn.Module, torch.Tensor]:
    """Logits near 1e5: fp32 rounding alone moves them by about 1e-3, far beyond 1e-4."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 10))
    with torch.no_grad():
        model[1].weight.mul_(1e5)
    return model.eval(), lat_export.check_inputs(SHAPE)


def test_beyond_the_absolute_tolerance_a_runtime_as_exact_as_pytorch_fp32_passes():
    model, x = _huge_logits()
    with torch.no_grad():
        fp32 = model(x).double().numpy()
        exact = copy.deepcopy(model).double()(x.double()).numpy()
    assert abs(fp32 - exact).max() > 10 * lat_export.EXPORT_TOLERANCE  # rounding, not a wrong graph
    rounded_otherwise = exact + 1.5 * (fp32 - exact)  # another summation order: 1.5 times PyTorch's error
    check = lat_export.check_logits(model, rounded_otherwise, x)
    assert check["max_abs_logit_diff"] > lat_export.EXPORT_TOLERANCE
    ref = check["float64_reference"]
    assert check["passed"] and ref["runtime_max_abs_diff"] == pytest.approx(1.5 * ref["pytorch_fp32_max_abs_diff"])


def test_a_runtime_off_by_more_than_rounding_fails_with_both_errors_named():
    model, x = _huge_logits()
    with torch.no_grad():
        wrong = model(x).double().numpy() + 1.0  # a bias of 1: no rounding does that
    check = lat_export.check_logits(model, wrong, x)
    assert not check["passed"]
    assert check["float64_reference"]["runtime_max_abs_diff"] > 4 * check["float64_reference"]["pytorch_fp32_max_abs_diff"]
    message = lat_export._failure(check)
    assert "> 0.0001" in message and "float64 evaluation" in message


def test_within_the_absolute_tolerance_no_float64_evaluation_is_made():
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 10)).eval()
    x = lat_export.check_inputs(SHAPE)
    with torch.no_grad():
        check = lat_export.check_logits(model, model(x).numpy(), x)
    assert check == {"max_abs_logit_diff": 0.0, "tolerance": lat_export.EXPORT_TOLERANCE, "passed": True}

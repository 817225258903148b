"""Training precision: resolution per device, the CPU capability check, and the run identity."""

from __future__ import annotations

import pytest
import torch

from prunebench.config.budgets import get_budget
from prunebench.config.run import RunConfig, run_id
from prunebench.errors import ConfigError
from prunebench.training import precision
from prunebench.training.precision import check_precision, cpu_supports_bf16, resolve_precision


def test_explicit_precisions_are_kept_and_unknown_ones_rejected():
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ConfigError, match="unknown precision 'fp16'. .*Available: auto, bf16, fp32"):
        check_precision("fp16")
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        resolve_precision("auto", "gpu")


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_a_cpu_follows_native_bf16_support(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: native)
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("auto", torch.device("cpu")) == expected


@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda_follows_the_device(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_precision("auto", "cuda:0") == expected
    assert resolve_precision("auto", "auto") == expected  # auto device: CUDA when there is one


def test_cpu_capability_is_checked_once_and_agrees_with_cpuinfo(tmp_path):
    assert cpu_supports_bf16() is cpu_supports_bf16()  # cached
    flags = precision._cpuinfo_flags()
    if flags and torch.backends.mkldnn.is_available():
        assert cpu_supports_bf16() == bool(flags & precision.CPU_BF16_FLAGS)
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n")
    assert "avx512_bf16" in precision._cpuinfo_flags(fake)
    assert precision._cpuinfo_flags(tmp_path / "missing") == frozenset()


def test_precision_enters_the_run_identity_except_fp32():
    base = RunConfig(criterion="l1", arch="resnet20", budget=get_budget("smoke"), device="cpu")
    fp32 = RunConfig(criterion="l1", arch="resnet20", budget=get_budget("smoke"), device="cpu", precision="fp32")
    bf16 = RunConfig(criterion="l1", arch="resnet20", budget=get_budget("smoke"), device="cpu", precision="bf16")
    assert "precision" not in fp32.identity()  # fp32 runs keep the ids they had before the switch
    assert bf16.identity()["precision"] == "bf16"
    assert run_id(fp32.identity()) != run_id(bf16.identity())
    auto = "bf16" if cpu_supports_bf16() else "fp32"
    assert run_id(base.identity()) == run_id((bf16 if auto == "bf16" else fp32).identity())
    with pytest.raises(ConfigError, match="unknown precision"):
        RunConfig(criterion="l1", arch="resnet20", budget=get_budget("smoke"), precision="half")

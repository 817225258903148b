"""Latency is never published unchecked: ``prunebench latency`` refuses a machine that is not
quiet (or, with --allow-noisy, marks the result unreliable with what it measured), and a model
that fails the ONNX export or its numeric check is a one-line error that leaves its accuracy
record as it was. Loads and clocks are synthetic here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from _support import copy_results
from torch import nn

from prunebench import cli
from prunebench.latency import protocol as lat
from prunebench.latency import quiet as lat_quiet


def machine(load: float, cpus: int = 2, probe_after: list[float] | None = None) -> lat_quiet.Machine:
    """Load ``load``; the probe kernel takes 1 ms, except in every check after a timing (probes
    3, 5, 7, ...: the first is at the start, then one before and one after each timing), which
    reads ``probe_after``: a machine that stays noisy however often the timing is repeated."""
    calls = [0]

    def probe() -> list[float]:
        calls[0] += 1
        after = calls[0] >= 3 and calls[0] % 2 == 1
        return probe_after if probe_after is not None and after else [0.001] * 15

    return lat_quiet.Machine(load=lambda: load, cpus=lambda: cpus, probe=probe, pause=lambda seconds: None)


def tick_clock():
    t = [0.0]

    def clock() -> float:
        t[0] += 0.001
        return t[0]

    return clock


def main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """``prunebench ARGS`` through the real entry point (its one-line errors), in this process."""
    monkeypatch.setattr(sys, "argv", ["prunebench", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_loaded_machine_is_refused_with_one_line_and_nothing_is_written(complete_run, tmp_path, monkeypatch,
                                                                           capsys):
    results = copy_results(complete_run, tmp_path / "r")
    monkeypatch.setattr(lat, "default_machine", lambda: machine(load=4.0))
    code, _, err = main(monkeypatch, capsys, "latency", results, "--runtime", "torch")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: the machine is not quiet enough to measure latency: load average 4.00")
    assert "--allow-noisy" in lines[0]
    assert not (results / "latency").exists()


def test_on_a_noisy_machine_allow_noisy_records_the_result_marked_unreliable(complete_run, tmp_path, monkeypatch,
                                                                              capsys):
    results = copy_results(complete_run, tmp_path / "r")
    before = files(results)
    monkeypatch.setattr(lat, "default_machine", lambda: machine(load=0.0, probe_after=[0.0015] * 15))
    monkeypatch.setattr(lat, "default_clock", tick_clock)
    code, out, _ = main(monkeypatch, capsys, "latency", results, "--runtime", "torch", "--batch", "1",
                        "--threads", "1", "--allow-noisy")
    assert code == 0, out
    [path] = (results / "latency").glob("*.json")
    record = json.loads(path.read_text())
    assert record["unreliable"] is True and record["quiet"]["probe_spread"] == pytest.approx(0.5)
    assert "UNRELIABLE (probe-kernel spread 50.0%" in out
    assert {k: v for k, v in files(results).items() if not k.startswith("latency")} == before


class BesselGate(nn.Module):
    """An op the ONNX exporter has no translation for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.special.i0(x)


def test_a_model_that_fails_the_onnx_export_is_one_line_naming_its_module_and_keeps_its_record(
        complete_run, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install 'prunebench[onnx]')")
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install 'prunebench[onnx]')")
    results = copy_results(complete_run, tmp_path / "r")
    before = files(results)
    real = lat.load_subject

    def with_an_unexportable_module(folder, record, others=()):
        subject = real(folder, record, others)
        block = subject.model.layer2[1]
        block.bn1 = nn.Sequential(block.bn1, BesselGate())
        return subject

    monkeypatch.setattr(lat, "load_subject", with_an_unexportable_module)
    monkeypatch.setattr(lat, "default_machine", lambda: machine(load=0.0))
    monkeypatch.setattr(lat, "default_clock", tick_clock)
    code, out, err = main(monkeypatch, capsys, "latency", results, "--runtime", "onnxruntime")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1, err
    assert "ONNX export failed in module BesselGate" in errors[0] and "accuracy record is unchanged" in errors[0]
    assert "1 model(s) failed" in out
    assert files(results) == before  # the accuracy record and model, byte for byte; no latency record

"""The ONNX export a runtime other than PyTorch times: exported once, checked against PyTorch's
logits (ONNX Runtime, OpenVINO), and the module that breaks it named when it fails."""

from __future__ import annotations

import contextlib
import copy
import io
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunebench.errors import PrunebenchError

RUNTIMES = ("torch", "onnxruntime", "openvino", "torch-cuda")

#: runtimes timed on the CUDA device (PyTorch eager fp32 there), measured where one is available
CUDA_RUNTIMES = ("torch-cuda",)


#: runtimes that run the exported ONNX graph, and the extra that installs each
ONNX_RUNTIMES = {"onnxruntime": "onnx", "openvino": "openvino"}


#: ONNX export check: max |Δ logits| against PyTorch, fp32, on CHECK_IMAGES seeded N(0, 1) inputs
EXPORT_TOLERANCE = 1e-4

#: ... or, where fp32 rounding alone exceeds that (large logits, deep networks), no less exact than
#: PyTorch's own fp32: the runtime's max |Δ logits| against a float64 evaluation of the same model at
#: most this many times PyTorch fp32's (measured on ResNet-56 models: 0.8-2.0 times). A wrong graph
#: (another operator, a folded input) is off by orders of magnitude more than rounding.
FP32_ROUNDING_FACTOR = 4.0


CHECK_IMAGES = 8


class ExportError(PrunebenchError):
    """A model does not export to ONNX, or its ONNX graph computes other logits than PyTorch."""


def installed(runtime: str) -> bool:
    """Is ``runtime`` usable here? ONNX runtimes need ``onnx`` (torch's exporter writes with it),
    ``onnxruntime`` (the export check) and their own package: the ``onnx`` / ``openvino`` extras."""
    if runtime == "torch":
        return True
    if runtime in CUDA_RUNTIMES:
        return torch.cuda.is_available()
    import importlib.util

    needed = ["onnx", "onnxruntime"] + (["openvino"] if runtime == "openvino" else [])
    return all(importlib.util.find_spec(name) is not None for name in needed)


def has_onnxruntime() -> bool:
    return installed("onnxruntime")


def runtime_version(runtime: str) -> str:
    if runtime == "torch":
        return torch.__version__
    if runtime in CUDA_RUNTIMES:
        return f"{torch.__version__} (CUDA {torch.version.cuda})"
    if runtime == "openvino":
        import openvino

        return openvino.__version__
    import onnxruntime

    return onnxruntime.__version__


@contextlib.contextmanager
def _exporter_silenced():
    """No warnings, and nothing on the process's stdout/stderr: torch's TorchScript exporter
    logs the whole graph there (at C++ level) when an export fails."""
    saved = []
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        with open(os.devnull, "w") as null:
            for fd in (1, 2):
                saved.append((fd, os.dup(fd)))
                os.dup2(null.fileno(), fd)
    except OSError:  # no such descriptors (embedded interpreters): export as is
        pass
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            yield
    finally:
        for fd, copy_ in saved:
            os.dup2(copy_, fd)
            os.close(copy_)


def export_onnx(model: nn.Module, example: torch.Tensor) -> bytes:
    """The ONNX graph of ``model`` (eval mode) with a dynamic batch dimension."""
    buffer = io.BytesIO()
    with _exporter_silenced():
        torch.onnx.export(model.eval(), (example,), buffer, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return buffer.getvalue()


def ort_session(graph: bytes, threads: int):
    """An ONNX Runtime CPU session pinned to ``threads`` intra-op threads, one inter-op thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # no busy-waiting between calls: two sessions timed interleaved would otherwise keep each
    # other's idle workers spinning on the cores the running one needs (and the probe kernel's)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(graph, sess_options=options, providers=["CPUExecutionProvider"])


def ort_logits(graph: bytes, inputs: torch.Tensor) -> np.ndarray | None:
    """ONNX Runtime's logits for ``inputs``; None when the graph ignores its input (folded into a constant)."""
    session = ort_session(graph, 1)
    if len(session.get_inputs()) != 1:
        return None
    return session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]


def check_logits(model: nn.Module, got: np.ndarray | None, inputs: torch.Tensor) -> dict[str, Any]:
    """Does a runtime's ``got`` compute ``model``? ``max_abs_logit_diff`` against PyTorch fp32 and
    whether it passes: within :data:`EXPORT_TOLERANCE`, or (measured only beyond it) no less exact
    than PyTorch fp32 against a float64 evaluation (:data:`FP32_ROUNDING_FACTOR`)."""
    with torch.no_grad():
        expected = model.eval()(inputs).float().numpy()
    if got is None or got.shape != expected.shape:
        return {"max_abs_logit_diff": float("inf"), "tolerance": EXPORT_TOLERANCE, "passed": False}
    diff = float(np.max(np.abs(got - expected)))
    out: dict[str, Any] = {"max_abs_logit_diff": diff, "tolerance": EXPORT_TOLERANCE, "passed": diff <= EXPORT_TOLERANCE}
    if not out["passed"] and np.isfinite(diff):
        with torch.no_grad():
            exact = copy.deepcopy(model).double().eval()(inputs.double()).numpy()
        runtime, pytorch = float(np.max(np.abs(got - exact))), float(np.max(np.abs(expected - exact)))
        out["float64_reference"] = {"runtime_max_abs_diff": runtime, "pytorch_fp32_max_abs_diff": pytorch,
                                    "factor": FP32_ROUNDING_FACTOR}
        out["passed"] = runtime <= FP32_ROUNDING_FACTOR * pytorch
    return out


def _failure(check: Mapping[str, Any]) -> str:
    diff = check["max_abs_logit_diff"]
    if not np.isfinite(diff):
        return "it ignores its input or gives logits of another shape"
    ref = check.get("float64_reference")
    how = f"max |Δ logits| {diff:.3g} > {EXPORT_TOLERANCE:g}"
    if ref is not None:
        how += (f", and {ref['runtime_max_abs_diff']:.3g} from a float64 evaluation, more than "
                f"{FP32_ROUNDING_FACTOR:g} × PyTorch fp32's {ref['pytorch_fp32_max_abs_diff']:.3g}")
    return how


def check_inputs(input_shape: Sequence[int], n: int = CHECK_IMAGES) -> torch.Tensor:
    """Calibration-like inputs: normalised images are about N(0, 1); seeded."""
    return torch.randn(n, *input_shape[1:], generator=torch.Generator().manual_seed(1234))


def exported(model: nn.Module, input_shape: Sequence[int]) -> tuple[bytes, dict[str, Any]]:
    """Export ``model`` and check it with ONNX Runtime: (graph, :func:`check_logits`'s result).
    Raises :class:`ExportError` naming the module type that fails the export or the check."""
    example = torch.zeros(1, *input_shape[1:])
    inputs = check_inputs(input_shape)
    try:
        graph = export_onnx(model, example)
        check = check_logits(model, ort_logits(graph, inputs), inputs)
    except Exception as exc:  # noqa: BLE001 - any failure of the exporter is reported the same way
        raise ExportError(f"ONNX export failed in module {culprit(model, example)} "
                          f"({type(exc).__name__}: {_first_line(exc)})") from None
    if not check["passed"]:
        raise ExportError(f"ONNX graph differs from PyTorch ({_failure(check)}) in module {culprit(model, inputs)}")
    return graph, check


def openvino_checked(model: nn.Module, graph: bytes, input_shape: Sequence[int]) -> dict[str, Any]:
    """OpenVINO's logits checked as ONNX Runtime's are (:func:`check_logits`); :class:`ExportError` when they fail."""
    inputs = check_inputs(input_shape)
    try:
        compiled = openvino_compiled(graph, inputs.shape, 1)
        got = compiled.create_infer_request().infer({0: inputs.numpy()})[compiled.output(0)]
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"OpenVINO cannot compile the ONNX graph ({type(exc).__name__}: {_first_line(exc)})") from None
    check = check_logits(model, np.asarray(got), inputs)
    if not check["passed"]:
        raise ExportError(f"OpenVINO computes other logits than PyTorch ({_failure(check)})")
    return check


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else "")[:200]


def culprit(model: nn.Module, example: torch.Tensor) -> str:
    """The type name of the innermost module that fails to export or to match PyTorch on its
    own (each module type tried once, deepest first); the model's own type when none does."""
    captured: dict[str, tuple[torch.Tensor, ...]] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(mod, args, out, name=name):
            if name not in captured and args and all(isinstance(a, torch.Tensor) for a in args):
                captured[name] = tuple(a.detach().clone() for a in args)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(example)
    except Exception:  # noqa: BLE001 - the model itself does not run: name it
        return type(model).__name__
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    tried: set[type] = set()
    for name in sorted(captured, key=lambda n: -n.count(".")):
        module = modules[name]
        if type(module) in tried:
            continue
        tried.add(type(module))
        if not _module_exports(module, captured[name]):
            return type(module).__name__
    return type(model).__name__


def _module_exports(module: nn.Module, args: tuple[torch.Tensor, ...]) -> bool:
    try:
        buffer = io.BytesIO()
        with _exporter_silenced():
            torch.onnx.export(module.eval(), args, buffer, dynamo=False)
        with torch.no_grad():
            expected = module(*args)
        if not isinstance(expected, torch.Tensor):
            return True  # only tensor outputs are compared
        session = ort_session(buffer.getvalue(), 1)
        if len(session.get_inputs()) != len(args):  # an input folded into a constant
            return False
        feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=False)}
        got = session.run(None, feeds)[0]
        return got.shape == tuple(expected.shape) and float(np.max(np.abs(got - expected.float().numpy()),
                                                                   initial=0.0)) <= EXPORT_TOLERANCE
    except Exception:  # noqa: BLE001
        return False


def openvino_compiled(graph: bytes, shape: Sequence[int], threads: int):
    """The ONNX graph compiled by OpenVINO for the CPU at a fixed input shape: ``threads``
    inference threads, one stream, fp32 inference precision (no bf16 where the CPU has it)."""
    import tempfile

    import openvino as ov

    core = ov.Core()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(graph)
        model = core.read_model(str(path))
    model.reshape({0: list(shape)})
    return core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                             "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})

"""Safe checkpoint loading: plain tensors only, checked before use, one-line errors.

Every checkpoint prunebench reads (``--baseline FILE``, cached baselines, compressed models)
goes through :func:`read`, which loads with ``torch.load(..., weights_only=True)``: a file
that would need arbitrary code to unpickle is refused, and torch's advice to retry with
``weights_only=False`` is never passed on. :func:`load_state` then checks that the state
dict holds only finite tensors and fits the model (names and shapes) before loading it.
Every failure is a :class:`~prunebench.errors.CheckpointError` that names the file.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prunebench.errors import CheckpointError
from prunebench.storage.files import replace_atomically

#: torch's wording around a refused global; only the sentence naming the refused thing is kept
_TORCH_ADVICE = re.compile(r"weights_only|Weights only|trusted source|file an issue|documentation of torch\.load",
                           re.IGNORECASE)


def read(path: str | Path, what: str = "checkpoint", data: bytes | None = None) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors.
    ``data``: the file's bytes, already read (so that what is loaded is what was hashed)."""
    path = Path(path)
    if data is None:
        if not path.exists():
            raise CheckpointError(f"{what} {path} does not exist")
        if not path.is_file():
            raise CheckpointError(f"{what} {path} is not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error says enough
            source = path if data is None else io.BytesIO(data)
            return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every way a file can fail to load
        raise CheckpointError(f"{what} {path} {_why(exc)}") from None


def read_bytes(path: str | Path, what: str = "checkpoint") -> bytes:
    """The bytes of a checkpoint file, with one-line errors."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None


_FILE_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}


def file_sha256(path: str | Path, what: str = "checkpoint") -> str:
    """The sha256 of a file's content (hex). Remembered per (path, inode, size, mtime, ctime)
    in this process, so that listing a sweep hashes each file once."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CheckpointError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _FILE_DIGESTS:
        _FILE_DIGESTS[key] = hashlib.sha256(read_bytes(path, what)).hexdigest()
    return _FILE_DIGESTS[key]


def weights_sha256(state: Mapping[str, Tensor]) -> str:
    """A digest of a state dict: sha256 over its tensors in name order, each as its name,
    dtype, shape and bytes (on the CPU). Equal weights give equal digests on any device."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(state[name].shape)}|".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _why(exc: Exception) -> str:
    text = str(exc)
    if "Weights only load failed" in text:
        reason = "; ".join(
            line.strip().removeprefix("WeightsUnpickler error:").strip()
            for line in text.splitlines() if line.strip() and not _TORCH_ADVICE.search(line)
        )
        return ("holds more than plain tensors, and loading it would run code from the file; refused "
                f"({reason or 'unsupported pickle content'}). Save it as a state dict of tensors")
    if isinstance(exc, PermissionError):
        return f"cannot be read ({exc.strerror or exc})"
    if isinstance(exc, EOFError | OSError) or "central directory" in text or "PytorchStreamReader" in text:
        return "is truncated or corrupt (not a complete PyTorch checkpoint); delete it or save it again"
    first = text.splitlines()[0][:120] if text.strip() else ""
    return f"is not a PyTorch checkpoint (unreadable as one: {type(exc).__name__}{': ' + first if first else ''})"


def state_dict(payload: Any, path: str | Path, what: str = "checkpoint") -> dict[str, Tensor]:
    """The state dict in a loaded checkpoint: ``payload["state_dict"]`` or the payload itself."""
    state = payload.get("state_dict", payload) if isinstance(payload, Mapping) else payload
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{what} {path} holds no state dict (a mapping of parameter names to tensors), "
                              f"but {type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{what} {path} is not a state dict: entry {bad[0]!r} is not a named tensor")
    for name, t in state.items():
        if t.is_meta:
            raise CheckpointError(f"{what} {path} holds a meta tensor without data in {name!r}; save the real weights")
        if t.layout != torch.strided:
            raise CheckpointError(f"{what} {path} holds a {str(t.layout).removeprefix('torch.')} tensor in "
                                  f"{name!r}; save dense tensors (tensor.to_dense())")
        if t.is_complex():
            raise CheckpointError(f"{what} {path} holds complex numbers in {name!r}; weights are real")
    return dict(state)


def non_finite(named: Mapping[str, Tensor] | Any) -> str | None:
    """The name of the first floating-point tensor holding NaN or infinity, or None."""
    for name, t in named.items():
        if torch.is_floating_point(t) and not bool(torch.isfinite(t).all()):
            return name
    return None


def check_finite(state: Mapping[str, Tensor], path: str | Path, what: str = "checkpoint") -> None:
    name = non_finite(state)
    if name is not None:
        raise CheckpointError(f"{what} {path} has non-finite values in {name!r} (the training that produced "
                              "it diverged); it cannot be used")


def check_fits(model: nn.Module, state: Mapping[str, Tensor], path: str | Path, what: str = "checkpoint") -> None:
    """Every tensor of the model is in ``state`` with the same shape, and nothing else is."""
    own = model.state_dict()
    # BatchNorm's num_batches_tracked counter may be absent (older checkpoints, e.g. the published
    # CIFAR ResNets): torch fills it in when loading, and it does not change what the model computes
    missing = [k for k in own if k not in state and k.rsplit(".", 1)[-1] != "num_batches_tracked"]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or shapes):
        wrong = [k for k, v in own.items() if k in state and torch.is_floating_point(v)
                 and not torch.is_floating_point(state[k])]
        if wrong:
            raise CheckpointError(f"{what} {path} holds {str(state[wrong[0]].dtype).removeprefix('torch.')} "
                                  f"values in {wrong[0]!r}, where the model has floating-point weights")
        weights = [k for k, v in own.items() if k in state and k.endswith("weight") and torch.is_floating_point(v)]
        if weights and not any(bool(state[k].any()) for k in weights):
            raise CheckpointError(f"{what} {path} holds only zeros in every weight; it is no trained model")
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape (file vs model)", shapes)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            parts.append(f"{label}: {', '.join(items[:3])}{more}")
    raise CheckpointError(f"{what} {path} does not fit the model ({type(model).__name__}): " + "; ".join(parts)
                          + ". Is it a checkpoint of another architecture or dataset?")


def load_state(model: nn.Module, path: str | Path, what: str = "checkpoint",
               payload: Any | None = None) -> dict[str, Any]:
    """Load ``path`` (or an already read ``payload``) into ``model`` after checking that it
    holds finite tensors that fit the model. Returns the checkpoint's other entries."""
    if payload is None:
        payload = read(path, what)
    state = state_dict(payload, path, what)
    check_finite(state, path, what)
    check_fits(model, state, path, what)
    model.load_state_dict(state)
    return {k: v for k, v in payload.items() if k != "state_dict"} if isinstance(payload, Mapping) else {}


def finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --- cached checkpoints: a digest stored beside the file when it is written ---------------------

#: the suffix of the file holding the sha256 of a cached checkpoint (``<name>.pt.sha256``)
DIGEST_SUFFIX = ".sha256"


def digest_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + DIGEST_SUFFIX)


def save_with_digest(obj: Any, path: str | Path) -> str:
    """Save ``obj`` to ``path`` atomically, then the sha256 of its bytes to ``<path>.sha256``;
    returns the digest. A reader checks the two with :func:`digest_mismatch`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    replace_atomically(Path(path), lambda f: f.write(data))
    replace_atomically(digest_path(path), lambda f: f.write(f"{digest}\n".encode()))
    return digest


def digest_mismatch(path: str | Path, data: bytes) -> str | None:
    """Why ``data`` (the bytes of the cached file ``path``) is not what was written there, or
    None when its sha256 is the one stored beside it."""
    stored = digest_path(path)
    try:
        expected = stored.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return f"has no stored digest ({stored.name} is missing), so its content cannot be verified"
    except (OSError, UnicodeDecodeError) as exc:
        return f"has an unreadable stored digest {stored.name} ({exc})"
    if hashlib.sha256(data).hexdigest() != expected:
        return f"does not match the digest stored when it was written ({stored.name}): it was changed"
    return None


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then move it into place (mode per the umask)."""
    replace_atomically(Path(path), lambda f: torch.save(obj, f))

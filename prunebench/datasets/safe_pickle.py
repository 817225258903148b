"""A restricted unpickler for the CIFAR "python version" files.

The official CIFAR-10/100 batches are pickled dicts of lists, strings and numpy arrays
(Krizhevsky, 2009). A plain ``pickle.load`` would run whatever a crafted file in the data
root asks for (``os.system``...); this unpickler resolves only the globals those files
need and refuses every other one before anything is called:

* numpy's array reconstruction: ``numpy.core.multiarray._reconstruct`` (the released files,
  written by Python 2), its numpy >= 2 home ``numpy._core.multiarray._reconstruct``,
  ``numpy._core.numeric._frombuffer`` (protocol 5), ``numpy.ndarray`` and ``numpy.dtype``;
* ``_codecs.encode``, which Python 3 uses to pickle ``bytes`` at protocol 2 (the same
  allowance torch's ``weights_only`` unpickler makes).

Arrays of Python objects are refused as well: the files hold only numbers and strings.
"""

from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import Any

from prunebench.errors import DataNotFoundError

#: (module, name) as written in a pickle -> (module, name) to import
ALLOWED: dict[tuple[str, str], tuple[str, str]] = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("_codecs", "encode"): ("_codecs", "encode"),
}
#: numpy < 2 has no numpy._core
_NUMPY1 = {"numpy._core.multiarray": "numpy.core.multiarray", "numpy._core.numeric": "numpy.core.numeric"}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle asked for a global outside :data:`ALLOWED`."""


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        target = ALLOWED.get((module, name))
        if target is None:
            raise RefusedGlobal(f"{module}.{name}")
        mod, attr = target
        try:
            return getattr(importlib.import_module(mod), attr)
        except ImportError:
            return getattr(importlib.import_module(_NUMPY1[mod]), attr)


def loads(data: bytes, encoding: str = "bytes") -> Any:
    """Unpickle ``data`` admitting only the globals in :data:`ALLOWED` (raises
    :class:`RefusedGlobal` for any other, before calling anything)."""
    obj = _Restricted(io.BytesIO(data), encoding=encoding).load()
    _refuse_object_arrays(obj)
    return obj


def _refuse_object_arrays(obj: Any, depth: int = 0) -> None:
    import numpy as np

    if depth > 4:
        return
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise RefusedGlobal("an array of Python objects")
    if isinstance(obj, dict):
        for v in obj.values():
            _refuse_object_arrays(v, depth + 1)


def load_file(path: Path) -> Any:
    """Unpickle a CIFAR python-version file, with one-line errors naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataNotFoundError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return loads(data)
    except RefusedGlobal as exc:
        raise DataNotFoundError(
            f"{path} is not a CIFAR python-version file: it asks to load {exc}, which the real files never "
            "do (refused, nothing was run). Replace it with the official file"
        ) from None
    except Exception as exc:  # noqa: BLE001 - truncated or garbled data fails in many ways
        raise DataNotFoundError(
            f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}); delete it and the archive "
            "it came from, and put the official files back"
        ) from None

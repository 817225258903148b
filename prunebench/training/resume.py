"""Resumable long stages: the partial checkpoints of baseline training and adaptation.

A stage that trains for minutes to hours (a baseline, the adaptation of a pretrained
checkpoint) saves its whole training state — weights, optimiser, the seeded generator, the
epoch's permutation, the step and the loss accumulators — at every epoch's end and at least
every ``interval`` seconds, atomically, beside the cached result it will produce
(``<cache>/baselines/<key>.partial.pt``, the one before it as ``.partial.prev.pt``). An
interrupted stage started again resumes from the newest readable one and ends with the same
weights as an uninterrupted run on the same machine (same thread count). A checkpoint that
cannot be read, or that belongs to another training, is named, set aside
(``.bad-<n>``) and the previous one is tried; the stage restarts from step 0 only when none
is usable. The stage's lock (held by the caller) keeps two processes from writing one stage;
the caller clears the partial files once the finished result is saved.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from prunebench.storage.checkpoints import atomic_torch_save

#: seconds between checkpoints inside an epoch (every epoch's end saves one too)
INTERVAL = 120.0


class StageCheckpoint:
    """Partial checkpoints of one training stage; ``fingerprint`` names the training (recipe,
    data size, seed, steps) so that a checkpoint of another one is never resumed."""

    def __init__(self, base: Path, fingerprint: Mapping[str, Any], log: Callable[[str], None] = print,
                 interval: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.current = Path(f"{base}.partial.pt")
        self.previous = Path(f"{base}.partial.prev.pt")
        self.fingerprint = {k: (list(v) if isinstance(v, tuple) else v) for k, v in fingerprint.items()}
        self.log = log
        env = os.environ.get("PRUNEBENCH_CHECKPOINT_SECONDS")
        self.interval = float(env) if interval is None and env else (INTERVAL if interval is None else interval)
        self.clock = clock
        self._last = clock()

    def load(self) -> dict[str, Any] | None:
        """The newest usable state, or None (start from step 0)."""
        for path in (self.current, self.previous):
            if not path.exists():
                continue
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint:
                    raise ValueError("it belongs to another training (recipe, data or seed differ)")
                for key in ("step", "perm", "generator", "model", "optimizer"):
                    if key not in state:
                        raise ValueError(f"it has no {key!r}")
            except Exception as exc:  # noqa: BLE001 - any unreadable file is set aside, never reused
                aside = self._set_aside(path)
                self.log(f"partial checkpoint {path} is not usable ({type(exc).__name__}: {exc}); "
                         f"set aside as {aside.name}")
                continue
            self.log(f"resuming from {path.name}: step {state['step']}")
            return state
        return None

    def _set_aside(self, path: Path) -> Path:
        n = 1
        while Path(f"{path}.bad-{n}").exists():
            n += 1
        aside = Path(f"{path}.bad-{n}")
        os.replace(path, aside)
        return aside

    def due(self, epoch_end: bool) -> bool:
        return epoch_end or self.clock() - self._last >= self.interval

    def save(self, state: Mapping[str, Any]) -> None:
        """Write ``state`` as the newest checkpoint, keeping the one before it."""
        if self.current.exists():
            os.replace(self.current, self.previous)
        atomic_torch_save({**state, "fingerprint": self.fingerprint}, self.current)
        self._last = self.clock()

    def clear(self) -> None:
        """Remove the partial checkpoints (the stage's result is saved)."""
        for path in (self.current, self.previous):
            path.unlink(missing_ok=True)

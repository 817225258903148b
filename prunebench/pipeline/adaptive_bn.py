"""Adaptive batch normalisation: re-estimate BatchNorm statistics after pruning.

Li, Wu, Li, Wang, Mi, Xu, "EagleEye: Fast Sub-net Evaluation for Efficient Neural Network
Pruning", ECCV 2020, Sec. 3.3: removing channels shifts the statistics that reach every
later BatchNorm layer, so the running mean and variance inherited from the unpruned
network no longer fit. Resetting them and re-estimating them by forward passes on a few
training batches (no gradient, weights unchanged) gives an accuracy that ranks pruned
candidates far better than the raw one-shot accuracy.

Here every BatchNorm layer's running statistics are reset and re-estimated as a cumulative
(equal-weight) average over the batches (``momentum=None``), with only the BatchNorm layers
in training mode (dropout and the like stay in evaluation mode). Only BatchNorm buffers
change; every parameter and every other buffer is left as it was.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers that track running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: Tensor, batch_size: int = 128) -> int:
    """Re-estimate the running statistics of every BatchNorm in ``model`` from ``images``
    (already normalised, on the model's device); returns the number of layers re-estimated.
    ``model`` is left in evaluation mode."""
    layers = batchnorms(model)
    if not layers or images.shape[0] == 0:
        model.eval()
        return 0
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
        m.train()
    try:
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size]
            if batch.shape[0] < 2 and start > 0:  # a batch of one has no variance; skip a ragged tail of one
                break
            model(batch)
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    return len(layers)

"""Time CORING scoring: the vectorised implementation against a straightforward reference.

For each architecture (randomly initialised, seeded), every Conv2d is scored twice in the
same process:

* **vectorised**: ``prunebench.criteria.coring.Coring.scores`` (one batched SVD per mode and
  layer, a vectorised distance matrix, the greedy elimination with cached row minima);
* **reference**: a per-filter Python loop of ``tensorly.base.unfold`` + ``numpy.linalg.svd``,
  the distance matrix filled one filter (row) at a time, and a Python greedy loop that
  rescans the whole masked matrix with ``numpy.argmin`` and recomputes the row sums on every
  step.

It checks that both give the same ranking for every layer and prints a table.

    python benchmarks/coring_scoring.py [--arch resnet56 vgg16_bn] [--distance vbd] [--rank 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import tensorly as tl
import torch
from tabulate import tabulate
from torch import nn

from prunebench.criteria.coring import DISTANCES, Coring


def _architectures() -> dict:
    from prunebench.architectures.cifar_resnet import RESNET56
    from prunebench.architectures.cifar_vgg import VGG16_BN

    return {"resnet56": RESNET56, "vgg16_bn": VGG16_BN}


# ----------------------------------------------------------------------------- reference
def _ref_mode_vectors(weight: np.ndarray, rank: int) -> list[np.ndarray]:
    vectors = []
    for mode in range(3):
        if weight.shape[1 + mode] == 1:
            continue
        rows = []
        for f in weight:  # one SVD per filter
            u = np.linalg.svd(tl.unfold(tl.tensor(f), mode), full_matrices=False)[0][:, :rank]
            for k in range(rank):
                if u[np.argmax(np.abs(u[:, k])), k] < 0:
                    u[:, k] = -u[:, k]
            rows.append(u.T.reshape(-1))
        vectors.append(np.stack(rows))
    return vectors


def _ref_row(v: np.ndarray, i: int, distance: str) -> np.ndarray:
    a, others = v[i], v
    if distance == "euclidean":
        return np.sqrt(((others - a) ** 2).sum(axis=1))
    if distance == "cosine":
        cos = others @ a / (np.linalg.norm(others, axis=1) * np.linalg.norm(a))
        return np.clip(1.0 - np.abs(cos), 0.0, None)
    den = np.var(others, axis=1) + np.var(a)
    return np.where(den > 0, np.var(others - a, axis=1) / np.where(den > 0, den, 1.0), 0.0)


def _ref_distance(weight: np.ndarray, rank: int, distance: str) -> np.ndarray:
    vectors = _ref_mode_vectors(weight, rank)
    n = weight.shape[0]
    if not vectors:
        return np.zeros((n, n))
    dist = np.zeros((n, n))
    for v in vectors:
        for i in range(n):
            dist[i] += _ref_row(v, i, distance)
    return dist / len(vectors)


def _ref_greedy(dist: np.ndarray) -> np.ndarray:
    n = dist.shape[0]
    d0 = 0.5 * (dist + dist.T)  # a distance is symmetric; rows were computed separately
    np.fill_diagonal(d0, 0.0)
    alive = np.ones(n, dtype=bool)
    scores = np.zeros(n)
    for step in range(n - 1):
        masked = np.where(alive[:, None] & alive[None, :], d0, np.inf)
        np.fill_diagonal(masked, np.inf)
        i, j = divmod(int(np.argmin(masked)), n)
        si = float(d0[i] @ alive)
        sj = float(d0[j] @ alive)
        r = j if sj < si or (sj == si and j < i) else i  # a tie removes the lower index
        scores[r] = step
        alive[r] = False
    scores[alive] = n - 1
    return scores


def reference_scores(model: nn.Module, names: list[str], rank: int, distance: str) -> dict[str, np.ndarray]:
    modules = dict(model.named_modules())
    return {
        name: _ref_greedy(_ref_distance(modules[name].weight.detach().double().numpy(), rank, distance))
        for name in names
    }


# ----------------------------------------------------------------------------- benchmark
def bench(arch_name: str, arch, distance: str, rank: int, repeat: int) -> dict:
    torch.manual_seed(0)
    model = arch.build(num_classes=10).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    filters = sum(dict(model.named_modules())[n].out_channels for n in names)
    crit = Coring.from_kwargs(rank=rank, distance=distance)

    crit.scores(model, names[:1], None)  # warm-up (first-call allocations)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        ours = crit.scores(model, names, None)
        times.append(time.perf_counter() - t0)
    t_vec = min(times)

    t0 = time.perf_counter()
    ref = reference_scores(model, names, rank, distance)
    t_ref = time.perf_counter() - t0

    same = sum(np.array_equal(ours[n].numpy().astype(np.int64), ref[n].astype(np.int64)) for n in names)
    return {
        "arch": arch_name,
        "convs": len(names),
        "filters": filters,
        "vectorised (s)": t_vec,
        "reference (s)": t_ref,
        "speed-up": t_ref / t_vec,
        "same ranking": f"{same}/{len(names)}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["resnet56", "vgg16_bn"])
    parser.add_argument("--distance", default="vbd", choices=DISTANCES)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument(
        "--repeat", type=int, default=3, help="timed runs of the vectorised scorer (best kept)"
    )
    args = parser.parse_args()

    archs = _architectures()
    rows = [bench(a, archs[a], args.distance, args.rank, args.repeat) for a in args.arch]
    print(
        f"CORING scoring, distance={args.distance}, rank={args.rank}, CPU, torch threads="
        f"{torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), "
        f"torch {torch.__version__}, numpy {np.__version__}, {platform.processor() or platform.machine()}"
    )
    print(tabulate(rows, headers="keys", floatfmt=".3f", tablefmt="github"))


if __name__ == "__main__":
    main()

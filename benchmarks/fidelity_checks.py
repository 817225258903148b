"""Measurements behind the documented choices of coring, ht2 and hbgs, on a trained ResNet-56.

    python benchmarks/fidelity_checks.py --checkpoint /path/to/resnet56-4bfd9763.th

* ``coring-sign``: how much CORING's vbd/euclidean rankings depend on the sign an SVD routine
  happens to return. Each layer is ranked with sign-fixed mode vectors (prunebench) and with
  every filter's vectors multiplied by random signs (what an unfixed SVD may return); the
  figure is the mean share of the 50%-kept filters the two rankings agree on. Cosine uses
  ``|cos|`` and is sign-free (share 1).
* ``ht2-r13``: in how many 3x3 convs (stem excluded) the R13 of the full kernel's
  ``(C k_h) x (T k_w)`` reshape (the authors' rule, now used) equals the energy rank of the
  projected core (the rule used before), per energy.
* ``hbgs-order``: per inner conv, the overlap of the 50% drop set of a single drop order with
  all original filters as targets and of the selector run again after every move of 5
  filters on the remaining ones (backward elimination and OMP).

Without ``--checkpoint`` a seeded random initialisation is used (numbers then say little).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn


def load(checkpoint: Path | None) -> nn.Module:
    from prunebench import registry

    model = registry.architectures.get("resnet56").build()
    if checkpoint is not None:
        payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = {}
        for k, v in payload["state_dict"].items():
            k = k.removeprefix("module.")
            state["fc." + k[len("linear."):] if k.startswith("linear.") else k] = v
        model.load_state_dict(state, strict=False)
    return model.eval()


def _kept(scores: torch.Tensor, keep: int) -> set[int]:
    return set(torch.argsort(scores, descending=True)[:keep].tolist())


def coring_sign(model: nn.Module, draws: int = 5) -> None:
    from prunebench.criteria._greedy import greedy_redundancy_scores
    from prunebench.criteria.coring import _pairwise, hosvd_mode_vectors

    g = torch.Generator().manual_seed(0)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    for distance in ("vbd", "euclidean", "cosine"):
        shares = []
        for _, conv in convs:
            vectors = hosvd_mode_vectors(conv.weight)
            n = conv.out_channels
            fixed = greedy_redundancy_scores(torch.stack([_pairwise(v, distance) for v in vectors]).mean(0))
            for _ in range(draws):
                flipped = [v * (torch.randint(0, 2, (n, 1), generator=g) * 2 - 1).double() for v in vectors]
                rand = greedy_redundancy_scores(torch.stack([_pairwise(v, distance) for v in flipped]).mean(0))
                keep = n // 2
                shares.append(len(_kept(fixed, keep) & _kept(rand, keep)) / keep)
        t = torch.tensor(shares)
        print(f"coring-sign {distance}: {len(convs)} convs x {draws} sign draws, kept-set agreement "
              f"mean {t.mean():.3f}, min {t.min():.3f}, identical in {(t == 1).float().mean():.1%}")


def ht2_r13(model: nn.Module) -> None:
    from prunebench.criteria._factorized import energy_rank
    from prunebench.criteria.ht2 import _core_spectrum, _mode_factors, ht2_ranks

    convs = [m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)][1:]
    for energy in (0.95, 0.9, 0.8, 0.7, 0.5):
        same, full_higher = 0, 0
        for conv in convs:
            r1, r13, r3 = ht2_ranks(conv, energy)
            core = _core_spectrum(conv, _mode_factors(conv, None, ""), r1, r3, None, "")
            r13_core = energy_rank(core.values, energy)
            same += r13 == r13_core
            full_higher += r13 > r13_core
        print(f"ht2-r13 energy {energy}: {len(convs)} convs, R13 equal in {same}, full-kernel rule higher in "
              f"{full_higher}, lower in {len(convs) - same - full_higher}")


def hbgs_order(model: nn.Module, block: int = 5) -> None:
    from prunebench.criteria._selection import SELECTORS, filter_gram, ridge_value
    from prunebench.criteria.hbgs.layer import UnitState

    convs = [m for n, m in model.named_modules() if n.endswith(".conv1") and isinstance(m, nn.Conv2d)]
    for selector in ("backward", "omp"):
        overlaps = []
        for conv in convs:
            n = conv.out_channels
            H = filter_gram(conv.weight)
            lam = ridge_value(H, 1e-4)
            drop = n // 2
            once = set(SELECTORS[selector][0](H, drop, lam).tolist())
            state = UnitState("c", ("c",), n, n - 1, H, lam, fold=True, drop_order=SELECTORS[selector][0])
            while state.removed < drop:
                state.apply(min(block, drop - state.removed))
            rerun = set(state.removed_set().tolist())
            overlaps.append(len(once & rerun) / drop)
        t = torch.tensor(overlaps)
        print(f"hbgs-order {selector}: {len(convs)} inner convs, 50% drop-set overlap once vs re-run "
              f"mean {t.mean():.3f}, min {t.min():.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("checks", nargs="*", default=["coring-sign", "ht2-r13", "hbgs-order"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load(args.checkpoint)
    print(f"ResNet-56 {'from ' + str(args.checkpoint) if args.checkpoint else 'at random initialisation'}")
    for check in args.checks:
        {"coring-sign": coring_sign, "ht2-r13": ht2_r13, "hbgs-order": hbgs_order}[check](model)


if __name__ == "__main__":
    main()

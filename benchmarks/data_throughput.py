"""Throughput of the streamed data path: decode + augment (img/s) and training steps with it.

Two sources, both streamed exactly as a run streams them (:mod:`prunebench.training.streaming`):

* ``cifar10-folder``: the 32x32 cifar10-jpeg images, decompressed into the cache as a plain tar (needs
  ``cifar10-jpeg.tar.gz`` under ``PRUNEBENCH_DATA``), at the recipe's input size 32;
* ``imagenet-like``: ``--images`` generated JPEGs of ImageNet's typical size (500x375,
  quality 90, random content at three scales tuned to about 110 KB per file, ImageNet's
  average; JPEG decoding time grows with the file size), at the ImageNet recipe's sizes (random-resized crop 224; resize 256,
  centre crop 224). Real ImageNet files differ in size and content; measure them with
  ``--folder PATH`` (an ImageFolder directory or plain tar with train/ and val/).

For each source it prints, per DataLoader worker count (``--workers``, default 0, 1, 2),
img/s for the training transform (decode, random-resized crop, flip; what the training loop
waits for) and the evaluation transform (decode, resize, centre crop), each variant timed once
per repeat, interleaved; then the training-step rate of ``tv_resnet18`` on the streamed batches
(``prunebench.training.streaming.train_streamed``) against the same steps on batches already in memory
(compute alone), at the given worker count. Medians over ``--repeats``.

    python benchmarks/data_throughput.py                      # both sources, workers 0/1/2
    python benchmarks/data_throughput.py --folder /data/imagenet --workers 0 4 8 --images 2048
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from prunebench.datasets.streaming import Preprocess, StreamedSplits, scan
from prunebench.results.records import cpu_name
from prunebench.training.steps import Recipe, TrainOptions, optimizer
from prunebench.training.streaming import TEST, TRAIN, StreamData, eval_batches, sample_seed, train_streamed


def imagenet_like(root: Path, n: int, classes: int = 10, seed: int = 0) -> Path:
    """``n`` training and ``n // 4`` validation JPEGs of 500x375 under ``root``."""
    import torch.nn.functional as F
    from torchvision.io import encode_jpeg

    gen = torch.Generator().manual_seed(seed)
    for split, count in (("train", n), ("val", max(classes, n // 4))):
        for i in range(count):
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            low = torch.rand(1, 3, 24, 32, generator=gen)
            img = F.interpolate(low, size=(375, 500), mode="bicubic", align_corners=False)[0] * 200 + 25
            mid = F.interpolate(torch.randn(1, 3, 94, 125, generator=gen), size=(375, 500), mode="bilinear")[0]
            img = (img + 30 * mid + 20 * torch.randn(img.shape, generator=gen)).clamp(0, 255).to(torch.uint8)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                (folder / f"{i:05d}.jpg").write_bytes(bytes(encode_jpeg(img, quality=90).numpy()))
    return root


def stream(splits: StreamedSplits, workers: int) -> StreamData:
    c = torch.zeros(1, 3, 1, 1)
    return StreamData(splits, torch.device("cpu"), c + 0.45, c + 0.25, workers=workers)


def images_per_second(data: StreamData, keys: list[list[tuple]]) -> float:
    t0 = time.perf_counter()
    n = sum(int(x.shape[0]) for x, _ in data.batches(lambda: iter(keys)))
    return n / (time.perf_counter() - t0)


def decode_rates(splits: StreamedSplits, workers: list[int], batch: int, repeats: int) -> dict[tuple, float]:
    n_train, n_test = len(splits.train), len(splits.test)
    train_keys = [[(TRAIN, i, sample_seed(0, 0, i)) for i in range(s, min(s + batch, n_train))]
                  for s in range(0, n_train, batch)]
    test_keys = list(eval_batches(TEST, list(range(n_test)), batch))
    loaders = {w: stream(splits, w) for w in workers}
    for w in workers:  # start the workers (persistent) and warm the caches
        images_per_second(loaders[w], train_keys[:1])
    rates: dict[tuple, list[float]] = {}
    for _ in range(repeats):
        for w in workers:
            rates.setdefault(("train", w), []).append(images_per_second(loaders[w], train_keys))
            rates.setdefault(("eval", w), []).append(images_per_second(loaders[w], test_keys))
    return {k: statistics.median(v) for k, v in rates.items()}


def step_rates(splits: StreamedSplits, workers: int, batch: int, steps: int, repeats: int) -> tuple[float, float]:
    """(img/s training on streamed batches, img/s training on in-memory batches)."""
    import torch.nn.functional as F

    from prunebench import registry

    arch = registry.architectures.get("tv_resnet18")
    data = stream(splits, workers)
    recipe = Recipe(epochs=steps / max(1, len(splits.train) // batch), lr=0.01, batch_size=batch, momentum=0.9,
                    weight_decay=1e-4, schedule="constant")
    opts = TrainOptions()
    cached = [(data.normalise(x), y) for x, y in data.train_batches(batch, 0, 0)][:steps]
    streamed_rates, memory_rates = [], []
    for r in range(repeats + 1):  # the first round warms up (and starts the workers)
        model = arch.build(num_classes=splits.num_classes)
        t0 = time.perf_counter()
        stats = train_streamed(model, data, recipe, seed=r, options=opts)
        streamed = stats["steps"] * batch / (time.perf_counter() - t0)
        model = arch.build(num_classes=splits.num_classes)
        opt = optimizer(model, recipe)
        precision_ctx = torch.autocast("cpu", dtype=torch.bfloat16) if _bf16() else torch.autocast("cpu", enabled=False)
        if _bf16():
            model.to(memory_format=torch.channels_last)
        t0 = time.perf_counter()
        for x, y in cached:
            with precision_ctx:
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        memory = len(cached) * batch / (time.perf_counter() - t0)
        if r:
            streamed_rates.append(streamed)
            memory_rates.append(memory)
    return statistics.median(streamed_rates), statistics.median(memory_rates)


def _bf16() -> bool:
    from prunebench.training.precision import resolve_precision

    return resolve_precision("auto", torch.device("cpu")) == "bf16"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--images", type=int, default=256, help="imagenet-like training images to generate")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6, help="training steps per timed round")
    ap.add_argument("--step-workers", type=int, default=None, help="workers for the step rate (default: the largest)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--folder", type=Path, default=None, help="an ImageFolder (train/, val/) to measure instead")
    ap.add_argument("--skip-cifar", action="store_true")
    args = ap.parse_args()
    print(f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"per process, precision {'bf16' if _bf16() else 'fp32'}")
    sources: list[tuple[str, StreamedSplits]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.folder is not None:
            train, test, classes, _ = scan(args.folder, ("val", "test"))
            sources.append((str(args.folder), StreamedSplits("folder", train, test, classes, (0.5,) * 3, (0.25,) * 3)))
        else:
            root = imagenet_like(Path(tmp) / "imagenet-like", args.images)
            train, test, classes, _ = scan(root)
            sources.append((f"imagenet-like ({len(train)} JPEGs of 500x375, crop 224)",
                            StreamedSplits("imagenet-like", train, test, classes, (0.5,) * 3, (0.25,) * 3)))
        if not args.skip_cifar:
            try:
                from prunebench.datasets.imagenet import load_cifar10_folder

                full = load_cifar10_folder()
                n = min(len(full.train), args.images * 8)
                cifar = StreamedSplits("cifar10-folder", full.train.subset(list(range(0, len(full.train),
                                       len(full.train) // n))[:n]), full.test.subset(list(range(0, n // 4))),
                                       full.classes, full.mean, full.std, Preprocess(32, 32, 32))
                sources.append((f"cifar10-folder ({n} JPEGs of 32x32, crop 32)", cifar))
            except Exception as exc:  # noqa: BLE001 - the archive is optional
                print(f"cifar10-folder skipped: {exc}")
        step_workers = args.step_workers if args.step_workers is not None else max(args.workers)
        for name, splits in sources:
            rates = decode_rates(splits, args.workers, args.batch_size, args.repeats)
            print(f"\n{name}: decode + augment, img/s (median of {args.repeats}, interleaved)\n")
            print("| workers | train (decode, random-resized crop, flip) | eval (decode, resize, centre crop) |")
            print("|---|---|---|")
            for w in args.workers:
                print(f"| {w} | {rates[('train', w)]:.0f} | {rates[('eval', w)]:.0f} |")
            streamed, memory = step_rates(splits, step_workers, args.batch_size, args.steps, args.repeats)
            print(f"\ntv_resnet18 training, batch {args.batch_size}, {step_workers} workers: streamed "
                  f"{streamed:.1f} img/s, in-memory batches {memory:.1f} img/s ({streamed / memory:.2f}x)")


if __name__ == "__main__":
    main()

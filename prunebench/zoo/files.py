"""Finding and verifying a zoo checkpoint's file.

Resolution order: ``<data root>/pretrained/<file>`` (``--data-dir`` / ``$PRUNEBENCH_DATA``),
then the cache (``<cache>/pretrained/<file>``, or torchvision's hub folder for torchvision
weights), then a download where the network allows (10 s timeout). The file's sha256 is
checked every time it is used, not only after a download; where only a prefix of the
sha256 is published, that prefix and the file's git object id (when known) are checked.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prunebench.datasets import cache_dir, data_root
from prunebench.errors import ConfigError, DataNotFoundError
from prunebench.storage.locks import hold
from prunebench.zoo.entries import ZooEntry

DOWNLOAD_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Resolved:
    """A verified checkpoint file and how it was found."""

    path: Path
    origin: str  # "data root" | "cache" | "download"
    sha256: str  # the file's full digest, as computed
    verified: str  # what was checked: "sha256" | "sha256 prefix + git object id" | "sha256 prefix"


def digests(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, in one read."""
    sha256 = hashlib.sha256()
    blob = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            sha256.update(block)
            blob.update(block)
    return sha256.hexdigest(), blob.hexdigest()


def mismatches(entry: ZooEntry, path: Path) -> tuple[str, list[str]]:
    """(the file's sha256, how it differs from the entry's hashes: empty when it matches)."""
    sha256, blob = digests(path)
    problems = []
    if not sha256.startswith(entry.sha256):
        problems.append(f"sha256 {sha256}, expected {entry.sha256}{'' if entry.sha256_complete else '...'}")
    if entry.git_blob and blob != entry.git_blob:
        problems.append(f"git object id {blob}, expected {entry.git_blob}")
    return sha256, problems


def verify(entry: ZooEntry, path: Path) -> Resolved:
    """Check ``path`` against the entry's hashes; :class:`ConfigError` when it does not match."""
    sha256, problems = mismatches(entry, path)
    if problems:
        raise ConfigError(
            f"pretrained checkpoint {path} is not {entry.name}'s file: {'; '.join(problems)}. "
            f"Delete it and put the file from {entry.url} there"
        )
    if entry.sha256_complete:
        verified = "sha256"
    else:
        verified = "sha256 prefix + git object id" if entry.git_blob else "sha256 prefix"
    return Resolved(path, "", sha256, verified)


def hub_dir() -> Path:
    """torchvision's checkpoint folder (``torch.hub.get_dir()/checkpoints``)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def candidates(entry: ZooEntry, data_dir: str | Path | None = None) -> list[tuple[str, Path]]:
    """Where the file is looked for, in order: (origin, path)."""
    cache = hub_dir() if entry.torchvision_weights else cache_dir() / "pretrained"
    return [("data root", data_root(data_dir) / "pretrained" / entry.file), ("cache", cache / entry.file)]


def resolve(entry: ZooEntry, data_dir: str | Path | None = None, download: bool = True) -> Resolved:
    """The entry's file, found and verified; downloaded into the cache when absent.

    Raises :class:`DataNotFoundError` naming the exact paths and the URL when the file is
    nowhere and cannot be downloaded, :class:`ConfigError` when a file found is the wrong one.
    """
    places = candidates(entry, data_dir)
    for origin, path in places:
        if path.is_file():
            return _with_origin(verify(entry, path), origin)
    cache_path = places[-1][1]
    why = "downloading was not attempted"
    if download:
        try:
            with hold(f"{cache_path}.lock"):  # one process downloads; the others wait, then find it
                if not cache_path.is_file():
                    _download(entry, cache_path)
            return _with_origin(verify(entry, cache_path), "download")
        except ConfigError:
            raise
        except Exception as exc:  # offline, firewalled, read-only cache, HTTP error...
            why = f"downloading failed ({type(exc).__name__}: {exc})"
    supplied = " This checkpoint is not shipped with prunebench's data: supply the file yourself." \
        if entry.user_supplied else ""
    raise DataNotFoundError(
        f"pretrained checkpoint {entry.file} ({entry.name}) not found: expected {places[0][1]} "
        f"(or {cache_path}); get it from {entry.url}; {why}.{supplied}"
    )


def _with_origin(resolved: Resolved, origin: str) -> Resolved:
    return Resolved(resolved.path, origin, resolved.sha256, resolved.verified)


def _download(entry: ZooEntry, dest: Path) -> None:
    """Fetch the entry's file to ``dest`` (via ``dest.part``); torchvision weights go through
    torchvision's weights API, which writes to its own hub folder."""
    if entry.torchvision_weights:
        from torchvision.models import get_weight

        get_weight(entry.torchvision_weights).get_state_dict(progress=False, check_hash=True)
        if not dest.is_file():
            raise OSError(f"torchvision did not write {dest}")
        return
    _fetch(entry.url, dest, check=lambda part: mismatches(entry, part)[1])
    if entry.license_file and entry.license_url and not (dest.parent / entry.license_file).is_file():
        try:  # the licence travels with the file
            _fetch(entry.license_url, dest.parent / entry.license_file)
        except Exception as exc:  # noqa: BLE001 - the checkpoint itself is fine
            warnings.warn(f"could not fetch {entry.license_url} ({exc}); the licence of {entry.file} is "
                          f"{entry.license}", stacklevel=3)


def _fetch(url: str, dest: Path, check: Callable[[Path], list[str]] | None = None) -> None:
    """Download ``url`` to ``dest`` via ``dest.part``; ``check`` lists problems that refuse the file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(part, "wb") as f:
            while block := response.read(1 << 20):
                f.write(block)
        problems = check(part) if check is not None else []
        if problems:  # a wrong download never lands in the cache
            raise OSError(f"the downloaded file does not match: {'; '.join(problems)}")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)

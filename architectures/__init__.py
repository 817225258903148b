"""Architectures: model factories with the pruning metadata the harness needs."""

from prunebench.architectures.base import Architecture

__all__ = ["Architecture"]

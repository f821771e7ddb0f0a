"""Tensor operations shared by the methods (no learnable parameters)."""
from __future__ import annotations

from affordance_core.ops.kmeans import kmeans

__all__ = ['kmeans']

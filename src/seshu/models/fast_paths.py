"""Seshu's faster ways through a plain transformers model, switched on wherever a model is built or loaded: the
same numbers (to float rounding), and the saved model stays one plain transformers loads."""

from __future__ import annotations

from typing import TypeVar

import torch

from seshu.models.experts import use_autocast_experts
from seshu.models.mamba import use_fast_scan

Model = TypeVar("Model", bound=torch.nn.Module)


def use_fast_paths(model: Model) -> Model:
    """A Mamba's chunked selective scan, and a mixture of experts' experts in the autocast dtype under mixed
    precision; a no-op for a model that has neither."""
    return use_autocast_experts(use_fast_scan(model))

"""The Llama model, its construction and loading: what every stage imports to get a model."""

from __future__ import annotations

import torch

from llmhpc.config.schema import ModelConfig
from llmhpc.models.llama import KVCache, Llama
from llmhpc.models.loader import load_pretrained


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> Llama:
    """A freshly initialized Llama; on 'meta' only shapes exist (for planning and sharding first).

    The model is always built on the meta device, then materialized with `to_empty` and
    initialized in place, so no memory is spent on a throwaway CPU initialization.
    """
    with torch.device("meta"):
        model = Llama(cfg)
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device=device)
    model.init_weights()
    return model


__all__ = ["KVCache", "Llama", "build_model", "load_pretrained"]

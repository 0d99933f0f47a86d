"""Model families: one module per family, each exposing `build(cfg) -> CausalLM` and `rules(cfg) -> [Rule]`."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..config import Config
from ..errors import CheckpointError

# config.json `model_type` -> family module in this package
FAMILIES = {
    "llama": "llama",
    "qwen2": "llama",
    "mixtral": "mixtral",
    "qwen2_moe": "qwen_moe",
    "qwen3_moe": "qwen_moe",
    "olmoe": "olmoe",
    "gpt_oss": "gpt_oss",
    "deepseek_v2": "deepseek",
    "deepseek_v3": "deepseek",
    "kimi_k2": "deepseek",
    "deepseek_v32": "deepseek_v32",
    "deepseek_v4": "deepseek_v4",
}


def family(cfg: Config) -> ModuleType:
    """The family module implementing this config's `model_type`."""
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}", file=cfg.file
        )
    return importlib.import_module(f"{__name__}.{FAMILIES[model_type]}")

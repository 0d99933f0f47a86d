"""Reading a checkpoint's config.json, with errors that name the file and the field."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Config:
    """A model's config.json: typed access, checked once, before any weight is read."""

    def __init__(self, data: dict[str, Any], file: str = "config.json"):
        if not isinstance(data, dict):
            raise CheckpointError("config must be a JSON object", file=file)
        self.data, self.file = data, file

    @classmethod
    def read(cls, path: Path) -> Config:
        """Parse a config.json file."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise CheckpointError("missing config.json", file=str(path)) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"not valid JSON ({e})", file=str(path)) from None
        return cls(data, str(path))

    def sha256(self) -> str:
        """Hex digest of the config as canonical JSON (keys sorted): the config hash provenance records."""
        return hashlib.sha256(json.dumps(self.data, sort_keys=True).encode()).hexdigest()

    def __contains__(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(self, key: str, default: Any = None) -> Any:
        """A field, or the default when it is absent or null."""
        value = self.data.get(key)
        return default if value is None else value

    def int(self, key: str, default: int | None = None, *, min: int = 1) -> int:
        """An integer field (required unless a default is given), at least `min`."""
        value = self.get(key, default)
        if value is None:
            raise CheckpointError(f"missing required field {key!r}", file=self.file)
        if isinstance(value, bool) or not isinstance(value, int) or value < min:
            raise CheckpointError(f"field {key!r} must be an integer >= {min}, got {value!r}", file=self.file)
        return value

    def float(self, key: str, default: float | None = None) -> float:
        """A numeric field (required unless a default is given)."""
        value = self.get(key, default)
        if value is None:
            raise CheckpointError(f"missing required field {key!r}", file=self.file)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CheckpointError(f"field {key!r} must be a number, got {value!r}", file=self.file)
        return float(value)

    def choice(self, key: str, options: tuple[str, ...], default: str | None = None) -> str:
        """A string field restricted to the values this runtime implements."""
        value = self.get(key, default)
        if value not in options:
            raise CheckpointError(f"field {key!r} is {value!r}; supported: {', '.join(options)}", file=self.file)
        return value

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the checkpoint was saved in (float32 when unstated)."""
        name = self.get("dtype") or self.get("torch_dtype") or "float32"
        return _DTYPES.get(str(name).replace("torch.", ""), torch.float32)

    def rope(self) -> dict[str, Any]:
        """RoPE parameters in one form, whether written as `rope_parameters` or legacy `rope_theta` + `rope_scaling`."""
        params = dict(self.get("rope_parameters") or {})
        if any(isinstance(v, dict) for v in params.values()):
            raise CheckpointError("per-layer-type rope_parameters are not supported by this family", file=self.file)
        params.update(self.get("rope_scaling") or {})
        params.setdefault("rope_type", params.pop("type", "default"))
        params.setdefault("rope_theta", self.float("rope_theta", 10000.0))
        if params["rope_type"] in ("yarn", "llama3"):
            params.setdefault(
                "original_max_position_embeddings",
                self.get("original_max_position_embeddings") or self.int("max_position_embeddings", 4096),
            )
        return params

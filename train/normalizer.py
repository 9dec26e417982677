"""Per-dimension min-max normalization to [-1, 1], stored as buffers so it travels inside ONNX graphs.

    norm = Normalizer.fit({"action": actions, "obs": obs})   # arrays (..., D), stats over all leading axes
    y = norm.normalize("action", x)                           # x * scale + offset
    norm2 = Normalizer.from_dict(json.loads(json.dumps(norm.to_dict())))

A dimension whose range is below `RANGE_EPS` (e.g. an unused coordinate) gets scale 1 and maps to 0,
instead of dividing by ~0 and blowing up the noise of its neighbours.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dpkit.errors import DpkitError

RANGE_EPS = 1e-4


class _Stats(nn.Module):
    """One key's statistics; buffers so they move with `.to()`, load from state dicts and export as constants."""

    def __init__(self, lo: np.ndarray, hi: np.ndarray, scale: np.ndarray, offset: np.ndarray):
        super().__init__()
        for name, value in (("min", lo), ("max", hi), ("scale", scale), ("offset", offset)):
            self.register_buffer(name, torch.as_tensor(np.asarray(value, dtype=np.float32)))


class Normalizer(nn.Module):
    """Per-dimension min-max to [-1, 1]; constant dimensions (range < 1e-4) map to 0 without dividing by ~0."""

    def __init__(self, stats: dict[str, dict[str, Any]]):
        super().__init__()
        self.stats = nn.ModuleDict()
        for key, s in stats.items():
            if not key.isidentifier():
                raise DpkitError(f"normalizer key {key!r} must be an identifier")
            arrays = {}
            for field in ("min", "max", "scale", "offset"):
                if field not in s:
                    raise DpkitError(f"normalizer entry {key!r} lacks {field!r}")
                try:
                    arr = np.asarray(s[field], dtype=np.float64)
                except (TypeError, ValueError):
                    raise DpkitError(f"normalizer {key}.{field} must be a list of numbers") from None
                if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)):
                    raise DpkitError(f"normalizer {key}.{field} must be a non-empty list of finite numbers")
                arrays[field] = arr
            sizes = {f: a.size for f, a in arrays.items()}
            if len(set(sizes.values())) != 1:
                raise DpkitError(f"normalizer entry {key!r} has mismatched lengths {sizes}")
            # x * scale + offset maps [min, max] onto [-1, 1] (or a standard score): the scale is 1 / spread, and
            # a spread <= 0 (a negative std, max < min) is damaged statistics, not a mirror image.
            if np.any(arrays["scale"] <= 0):
                raise DpkitError(f"normalizer {key}.scale must be > 0 (1 / the spread of the data), got "
                                 f"{arrays['scale'][arrays['scale'] <= 0][0]:g}")
            self.stats[key] = _Stats(arrays["min"], arrays["max"], arrays["scale"], arrays["offset"])

    @classmethod
    def fit(cls, data: dict[str, np.ndarray]) -> "Normalizer":
        """Statistics over every axis but the last (the feature axis) of each array."""
        stats = {}
        for key, arr in data.items():
            arr = np.asarray(arr, dtype=np.float64)
            if arr.ndim < 1 or arr.shape[-1] == 0 or arr.size == 0:
                raise DpkitError(f"cannot fit normalizer for {key!r}: empty array of shape {arr.shape}")
            flat = arr.reshape(-1, arr.shape[-1])
            if not np.all(np.isfinite(flat)):
                raise DpkitError(f"cannot fit normalizer for {key!r}: data contains NaN or Inf")
            lo, hi = flat.min(axis=0), flat.max(axis=0)
            rng = hi - lo
            constant = rng < RANGE_EPS
            # Map [lo, hi] onto [-1, 1]; constant dimensions are only shifted (x - lo -> 0).
            scale = np.where(constant, 1.0, 2.0 / np.where(constant, 1.0, rng))
            offset = np.where(constant, -lo, -1.0 - lo * scale)
            stats[key] = {"min": lo, "max": hi, "scale": scale, "offset": offset}
        return cls(stats)

    @property
    def keys(self) -> list[str]:
        return list(self.stats.keys())

    def dim(self, key: str) -> int:
        """Number of feature dimensions stored for `key`."""
        return int(self._get(key).scale.shape[0])

    def _get(self, key: str) -> _Stats:
        if key not in self.stats:
            raise DpkitError(f"normalizer has no statistics for {key!r} (has: {', '.join(self.keys) or 'none'})")
        return self.stats[key]

    def _check_dim(self, key: str, s: _Stats, x: Tensor) -> None:
        if x.shape[-1] != s.scale.shape[0]:
            raise DpkitError(f"normalizer {key!r} expects last dimension {s.scale.shape[0]}, got shape {tuple(x.shape)}")

    def normalize(self, key: str, x: Tensor) -> Tensor:
        s = self._get(key)
        self._check_dim(key, s, x)
        return x * s.scale + s.offset

    def unnormalize(self, key: str, x: Tensor) -> Tensor:
        s = self._get(key)
        self._check_dim(key, s, x)
        return (x - s.offset) / s.scale

    def unnormalize_affine(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(scale, offset) in float64 with `unnormalize(x) == x * scale + offset` (the bundle's direction)."""
        s = self._get(key)
        scale = s.scale.detach().cpu().double().numpy()
        offset = s.offset.detach().cpu().double().numpy()
        return 1.0 / scale, -offset / scale

    def subset(self, keys: list[str]) -> "Normalizer":
        """A new Normalizer (own buffers) holding only `keys`."""
        for k in keys:
            self._get(k)  # unknown key -> DpkitError naming it
        d = self.to_dict()
        return Normalizer({k: d[k] for k in keys})

    def to_dict(self) -> dict[str, dict[str, list[float]]]:
        return {
            key: {f: [float(v) for v in getattr(s, f).detach().cpu().tolist()] for f in ("min", "max", "scale", "offset")}
            for key, s in self.stats.items()
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Normalizer":
        if not isinstance(d, dict) or not all(isinstance(v, dict) for v in d.values()):
            raise DpkitError("normalizer dict must map each key to {'min', 'max', 'scale', 'offset'}")
        return cls(d)

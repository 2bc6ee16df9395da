"""Pictures of samples: PNG grids a person can look at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .io import _atomic


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid_array(images: torch.Tensor, ncol: int = 8, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile images into one (H', W', C) uint8 array, each image scaled up by `scale` (nearest)."""
    x = to_uint8(images)
    if scale > 1:
        x = x.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = x.shape
    ncol = min(ncol, n)
    nrow = -(-n // ncol)
    out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    return out


def save_grid(images: torch.Tensor, path: Path, ncol: int = 8, scale: int | None = None) -> Path:
    """A PNG grid; small images are enlarged (16 px digits 4x, 64 px 2x, 128 px and up as they are)."""
    from PIL import Image

    scale = scale or max(1, min(4, 128 // int(images.shape[-1])))
    arr = grid_array(images, ncol=ncol, scale=scale)
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    return _atomic(Path(path), lambda p: img.save(p, format="PNG"))

"""Training data: scikit-learn's bundled digits (the embedded default) or a folder of images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import FlexdiffError

DIGITS_RESOLUTION = 16
SPLIT_SEED = 0
TEST_FRACTION = 0.2
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load_digits_split(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as (N, 1, 16, 16) float tensors in [-1, 1] and integer labels.

    The 8x8 originals (values 0..16) are bilinearly upsampled to 16x16. The split is fixed
    (stratified, seed 0, 20% test) so every command sees the same images. `split` is
    "train", "test" or "all".
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", "all"):
        raise FlexdiffError(f"split must be one of train, test, all (got {split!r})")
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=DIGITS_RESOLUTION, mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 2 - 1).contiguous()
    labels = torch.tensor(bunch.target, dtype=torch.long)
    if split == "all":
        return images, labels
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=bunch.target
    )
    chosen = np.sort(train_idx if split == "train" else test_idx)
    return images[chosen], labels[chosen]


def load_image_folder(folder: Path, resolution: int, channels: int | None = None,
                      option: str = "--data") -> torch.Tensor:
    """All images under `folder` as (N, C, resolution, resolution) in [-1, 1].

    C is 1 if every image is grayscale, else 3 (or `channels` when given).
    """
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise FlexdiffError(f"{option} {folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FlexdiffError(
            f"{option} {folder}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    pil = []
    for f in files:
        try:
            with Image.open(f) as im:
                pil.append(im.copy())
        except (UnidentifiedImageError, OSError) as e:
            raise FlexdiffError(f"{option}: cannot read image {f}: {e}") from None
    if channels is None:
        channels = 1 if all(im.mode in ("L", "1", "I;16", "I") for im in pil) else 3
    if channels not in (1, 3):
        raise FlexdiffError(f"channels must be 1 or 3 (got {channels})")
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for im in pil:
        im = im.convert(mode).resize((resolution, resolution), Image.BICUBIC)
        a = np.asarray(im, dtype=np.float32) / 255.0
        arrays.append(a[None] if channels == 1 else a.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays)) * 2 - 1

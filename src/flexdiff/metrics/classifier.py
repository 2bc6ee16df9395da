"""The small digits classifier whose penultimate features define flexdiff's default FID space."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from ..errors import FlexdiffError
from ..io import save_safetensors, write_json
from ..models import assets_dir

FEATURE_DIM = 64


class DigitsClassifier(nn.Module):
    """Three convolutions and two linear layers; `features` = the 64 values before the last ReLU.

    Taking them before the ReLU matters: after it, about half are always zero, which makes the
    feature covariance singular (measured on a prototype, docs/metrics.md).
    """

    def __init__(self, in_channels: int = 1, feature_dim: int = FEATURE_DIM, num_classes: int = 10):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.embed = nn.Linear(64 * 16, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.convs(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.features(x)))


def default_classifier_dir() -> Path:
    return assets_dir() / "classifier"


def train_classifier(out_dir: Path, epochs: int = 30, seed: int = 0, progress=None) -> dict:
    """Train on the digits train split with light shift augmentation; report test accuracy."""
    from ..data import load_digits_split

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_tr, y_tr = load_digits_split("train")
    x_te, y_te = load_digits_split("test")
    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    t0 = time.perf_counter()
    task = progress.add_task("classifier", total=epochs) if progress else None
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x_tr), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            xb = x_tr[idx]
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()  # +-1 pixel translation
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(xb), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        if task is not None:
            progress.update(task, advance=1)
    model.eval()
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(out_dir / "model.safetensors", model.state_dict())
    info = dict(
        architecture="DigitsClassifier", feature_dim=FEATURE_DIM, epochs=epochs, seed=seed,
        test_accuracy=acc, test_images=len(y_te), wall_time_s=time.perf_counter() - t0,
    )
    write_json(out_dir / "config.json", info)
    return info


def load_classifier(path: Path | None = None) -> DigitsClassifier:
    path = default_classifier_dir() if path is None else Path(path)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FlexdiffError(f"classifier {path}: no model.safetensors")
    try:
        info = json.loads((path / "config.json").read_text())
        model = DigitsClassifier(feature_dim=info.get("feature_dim", FEATURE_DIM))
        model.load_state_dict(load_file(weights))
    except Exception as e:
        raise FlexdiffError(f"classifier {path}: cannot load ({str(e).splitlines()[0]})") from None
    return model.eval().requires_grad_(False)


@torch.no_grad()
def classifier_features(model: DigitsClassifier, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """Penultimate features of images in [-1, 1], as float64 for the statistics."""
    images = images.clamp(-1, 1)
    return torch.cat([model.features(images[i:i + batch]) for i in range(0, len(images), batch)]).double()


# Layout of `classifier_statistics`: per-channel spatial mean and std of the three conv layers
# (after their ReLU), then the 64 penultimate features.
CONV_CHANNELS = (32, 64, 64)
STATS_DIM = 2 * sum(CONV_CHANNELS)
PENULTIMATE = slice(STATS_DIM, STATS_DIM + FEATURE_DIM)


@torch.no_grad()
def classifier_statistics(model: DigitsClassifier, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """(N, 384) float64: conv-layer statistics (320) and penultimate features (64) of images in [-1, 1].

    The penultimate features sit in ten tight class clusters, so a Fréchet distance on them
    mostly counts samples per class. The conv layers' channel statistics describe strokes,
    edges and texture within a class (noise raises them, blur lowers them): docs/metrics.md.
    """
    out = []
    for i in range(0, len(images), batch):
        h = images[i:i + batch].clamp(-1, 1)
        parts = []
        for k in (1, 3, 5):  # the ReLU after each conv
            h = model.convs[k](model.convs[k - 1](h))
            parts += [h.mean((2, 3)), h.std((2, 3))]
        parts.append(model.embed(model.convs[7](model.convs[6](h))))
        out.append(torch.cat(parts, 1))
    return torch.cat(out).double()


def classify_statistics(model: DigitsClassifier, feats: np.ndarray) -> np.ndarray:
    """Predicted class of each row of `classifier_statistics` (from its penultimate part)."""
    with torch.no_grad():
        pen = torch.from_numpy(np.ascontiguousarray(feats[:, PENULTIMATE])).float()
        return model.head(F.relu(pen)).argmax(1).numpy()

"""Standard Inception FID features (pytorch-fid's network), from a local weights file only."""

from __future__ import annotations

import tempfile
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from ..errors import FlexdiffError


class InceptionFeatures:
    """2048-d pool features of pytorch-fid's InceptionV3, with weights read from `weights_path`.

    pytorch-fid normally downloads its weights through torch hub. Here the hub folder is a
    temporary one holding only a link to the user's file, so nothing is ever fetched.
    """

    def __init__(self, weights_path: Path):
        weights_path = Path(weights_path)
        if not weights_path.is_file():
            raise FlexdiffError(
                f"--inception-weights {weights_path}: no such file (expected pytorch-fid's "
                "pt_inception-2015-12-05-6726825d.pth; flexdiff never downloads it)"
            )
        try:
            from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3
        except ImportError:
            raise FlexdiffError(
                "Inception FID needs pytorch-fid: pip install 'flexdiff[inception]' "
                "(it depends on torchvision)"
            ) from None
        previous = torch.hub.get_dir()
        with tempfile.TemporaryDirectory() as hub:
            checkpoints = Path(hub) / "checkpoints"
            checkpoints.mkdir()
            (checkpoints / Path(urlparse(FID_WEIGHTS_URL).path).name).symlink_to(weights_path.resolve())
            torch.hub.set_dir(hub)
            try:
                self.model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
            except Exception as e:
                raise FlexdiffError(f"--inception-weights {weights_path}: cannot load ({e})") from None
            finally:
                torch.hub.set_dir(previous)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch: int = 100) -> np.ndarray:
        x = (images.clamp(-1, 1) + 1) / 2  # pytorch-fid expects [0, 1]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        feats = [self.model(x[i:i + batch])[0].flatten(1) for i in range(0, len(x), batch)]
        return torch.cat(feats).double().numpy()

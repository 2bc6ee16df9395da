"""Standard Inception FID features (pytorch-fid's network), from a local weights file only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import FlexdiffError, first_line


class InceptionFeatures:
    """2048-d pool features of pytorch-fid's InceptionV3, with weights read from `weights_path`.

    pytorch-fid fetches its weights with `load_state_dict_from_url`, which downloads and then
    unpickles whatever it finds (`weights_only=False`). While the network is built, that function
    is replaced by one that reads the user's file with `torch.load(weights_only=True)`: nothing is
    fetched and nothing is unpickled beyond tensors.
    """

    def __init__(self, weights_path: Path):
        weights_path = Path(weights_path)
        if not weights_path.is_file():
            raise FlexdiffError(
                f"--inception-weights {weights_path}: no such file (expected pytorch-fid's "
                "pt_inception-2015-12-05-6726825d.pth; flexdiff never downloads it)"
            )
        try:
            import pytorch_fid.inception as fid_inception
        except ImportError:
            raise FlexdiffError(
                "Inception FID needs pytorch-fid: pip install 'flexdiff[inception]' "
                "(it depends on torchvision)"
            ) from None

        def local_weights(url, *args, **kwargs):
            try:
                return torch.load(weights_path, map_location="cpu", weights_only=True)
            except Exception as e:  # pickles with code, truncated files, foreign formats
                raise FlexdiffError(f"--inception-weights {weights_path}: not a plain weights file "
                                    f"({first_line(e)})") from None

        original = getattr(fid_inception, "load_state_dict_from_url", None)
        fid_inception.load_state_dict_from_url = local_weights
        try:
            self.model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
        except FlexdiffError:
            raise
        except Exception as e:
            raise FlexdiffError(f"--inception-weights {weights_path}: cannot load ({e})") from None
        finally:
            fid_inception.load_state_dict_from_url = original

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch: int = 100) -> np.ndarray:
        x = (images.clamp(-1, 1) + 1) / 2  # pytorch-fid expects [0, 1]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        feats = [self.model(x[i:i + batch])[0].flatten(1) for i in range(0, len(x), batch)]
        return torch.cat(feats).double().numpy()

"""CLIP score (Hessel et al. 2021): how well each image matches its prompt, 100 x the cosine of CLIP's
image and text embeddings (floored at 0), with a CLIP model loaded from a local folder (safetensors,
no download): `--clip-model DIR` as `CLIPModel.save_pretrained` and `CLIPProcessor.save_pretrained`
write it. Computed here from the model's own forward (its normalised `image_embeds` and
`text_embeds`), not with torchmetrics' CLIPScore, which breaks on transformers 5 (its
`get_image_features` returns an output object there)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import FlexdiffError, first_line


def load_clip(folder: Path):
    """(model, processor) from a local folder, refused with the option's name if anything is missing."""
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(folder)
    if not folder.is_dir():
        raise FlexdiffError(f"--clip-model {folder}: no such folder")
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises many kinds for a folder that is not a CLIP model
        raise FlexdiffError(f"--clip-model {folder}: not a CLIP model and processor saved with save_pretrained "
                            f"(safetensors) ({first_line(e)})") from None
    return model, processor


@torch.no_grad()
def clip_scores(images: torch.Tensor, prompts: list[str], clip, batch_size: int = 32) -> np.ndarray:
    """Per-sample CLIP score of images in [-1, 1] against their prompts (same order)."""
    model, processor = clip
    if len(prompts) != len(images):
        raise FlexdiffError(f"CLIP score needs one prompt per image ({len(prompts)} prompts, {len(images)} images)")
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    out = []
    for i in range(0, len(images), batch_size):
        batch = [p.permute(1, 2, 0).numpy() for p in pixels[i:i + batch_size]]
        inputs = processor(text=list(prompts[i:i + batch_size]), images=batch, return_tensors="pt", padding=True,
                           truncation=True)
        res = model(**inputs)
        cos = (res.image_embeds * res.text_embeds).sum(-1)  # both unit length
        out.append((100 * cos.clamp(min=0)).float())
    return torch.cat(out).numpy()

"""The rest of a diffusers pipeline folder: the decoder (VAE or VQ-VAE) that turns latents into
images, and the text encoders that turn prompts into conditioning, each used the way the
pipeline itself uses it (its own `encode_prompt`, its decoder's scaling factor, SDXL's added
conditions from its own `_get_add_time_ids`).

Loaded from the local folder only (`local_files_only`, safetensors only): nothing is fetched.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .conditioning import Conditioning, embeds_guidance
from .devices import move, placement
from .errors import FlexdiffError, first_line
from .io import read_json_object

DECODERS = ("vae", "vqvae")
TEXT_PARTS = ("text_encoder", "tokenizer")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def pipeline_index(path: Path) -> dict | None:
    f = Path(path) / "model_index.json"
    return read_json_object(f, "the pipeline index") if f.exists() else None


def _present(index: dict, name: str) -> bool:
    v = index.get(name)
    return isinstance(v, list) and len(v) == 2 and v[0] is not None and v[1] is not None


def side_networks(index: dict | None) -> str | None:
    """'ControlNet' or 'T2I-Adapter' when the pipeline steers its UNet with one (None otherwise)."""
    if index is None:
        return None
    if _present(index, "controlnet"):
        return "ControlNet"
    return "T2I-Adapter" if _present(index, "adapter") else None


def needs_parts(index: dict | None) -> bool:
    """Does the pipeline hold a decoder or text encoders (else the UNet alone samples images)?"""
    return index is not None and any(_present(index, n) for n in DECODERS + TEXT_PARTS)


class PipelineParts:
    """A pipeline's decoder and prompt encoders around flexdiff's own sampling loop."""

    def __init__(self, pipe):
        self.pipe = pipe
        self._prompt_length: int | None = None

    @classmethod
    def load(cls, path: Path, unet) -> "PipelineParts":
        """The pipeline in `path` around the denoiser `unet` already loaded (its `unet` or `transformer`)."""
        from diffusers import DiffusionPipeline

        index = pipeline_index(path) or {}
        extra = {}
        if "safety_checker" in index:  # flexdiff measures the raw model; the checker is not loaded
            extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # flexdiff's own bars say what runs; an error stays one line
        try:  # transformers 5 draws a bar of its own while it loads the text encoders' weights
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
        except ImportError:
            pass
        try:
            slot = "transformer" if "transformer" in index else "unet"
            extra.update({k: None for k, v in index.items() if v == [None, None]})  # saved without (SD3's T5)
            pipe = DiffusionPipeline.from_pretrained(path, **{slot: unet}, use_safetensors=True, local_files_only=True,
                                                     **extra)
        except Exception as e:  # diffusers / transformers raise many kinds for a broken folder
            raise FlexdiffError(f"--model {path}: cannot load the pipeline's other parts ({first_line(e)}); flexdiff loads "
                                "safetensors weights and local tokenizer files only") from None
        for part in DECODERS + TEXT_ENCODERS + ("tokenizer", "tokenizer_2", "tokenizer_3"):
            if _present(index, part) and getattr(pipe, part, None) is None:  # named, but nothing came of it
                raise FlexdiffError(f"--model {path}: model_index.json names a {part} ({index[part][1]}) that could not "
                                    f"be loaded from {path / part}; without it the samples would not be "
                                    f"{'decoded' if part in DECODERS else 'conditioned on the prompts'}")
        for part in DECODERS + TEXT_ENCODERS:
            m = getattr(pipe, part, None)
            if isinstance(m, torch.nn.Module):
                m.eval().requires_grad_(False)
        if getattr(unet.config, "sample_size", None) is None and getattr(pipe, "default_sample_size", None):
            unet.flexdiff_latent_size = int(pipe.default_sample_size)  # FLUX: the latents its pipeline makes
        return cls(pipe)

    def to(self, device: torch.device, dtype: torch.dtype) -> "PipelineParts":
        """Move the text encoders to the device and dtype, and the decoder to the device in float32 (a VAE
        decoding in float16 can overflow, as SDXL's does; decoding is a small share of the time)."""
        for part in DECODERS + TEXT_ENCODERS:
            m = getattr(self.pipe, part, None)
            if isinstance(m, torch.nn.Module):
                move(m, device, torch.float32 if part in DECODERS else dtype)
        return self

    # ---- what it holds
    @property
    def decoder(self):
        return getattr(self.pipe, "vae", None) or getattr(self.pipe, "vqvae", None)

    @property
    def denoiser(self):
        return getattr(self.pipe, "unet", None) or self.pipe.transformer

    @property
    def has_text(self) -> bool:
        return any(getattr(self.pipe, p, None) is not None for p in TEXT_ENCODERS)

    @property
    def is_sdxl(self) -> bool:
        return getattr(self.denoiser.config, "addition_embed_type", None) == "text_time"

    @property
    def image_size(self) -> int:
        """Side of the decoded image in pixels."""
        d = self.denoiser
        size = getattr(d.config, "sample_size", None) or getattr(d, "flexdiff_latent_size", 128)
        return int(size) * int(getattr(self.pipe, "vae_scale_factor", 1) or 1)

    # ---- latents -> images
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Latents to images in [-1, 1], as the pipeline decodes them (scaling factor, shift)."""
        d = self.decoder
        if d is None:
            return latents
        cfg = d.config
        z = latents / float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
        shift = getattr(cfg, "shift_factor", None)
        if shift is not None:
            z = z + float(shift)
        device, dtype = placement(d)
        out = [d.decode(z[i:i + batch_size].to(device=device, dtype=dtype)).sample.float().cpu()
               for i in range(0, len(z), batch_size)]
        return torch.cat(out).clamp(-1, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Images in [-1, 1] to the latents the UNet was trained on (the decoder's mean, times its scaling factor)."""
        d = self.decoder
        cfg = d.config
        out = []
        for i in range(0, len(images), batch_size):
            device, dtype = placement(d)
            enc = d.encode(images[i:i + batch_size].to(device=device, dtype=dtype))
            z = enc.latent_dist.mode() if hasattr(enc, "latent_dist") else enc.latents
            out.append(z.float().cpu())
        z = torch.cat(out)
        shift = getattr(cfg, "shift_factor", None)
        if shift is not None:
            z = z - float(shift)
        return z * float(getattr(cfg, "scaling_factor", 1.0) or 1.0)

    # ---- prompts -> conditioning
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], n: int, negative: str | None = None, guidance: float = 1.0):
        """Conditioning of n samples, row i with prompts[i % len(prompts)]; the unconditional branch is
        what the pipeline makes of `negative` (None: its own choice, the empty prompt or zeros for SDXL)."""
        if not self.has_text:
            raise FlexdiffError("--prompt: this pipeline has no text encoder")
        if not prompts:
            raise FlexdiffError("--prompts: the file holds no prompt (one per line)")
        guided = guidance != 1.0
        encoder = next(getattr(self.pipe, p) for p in TEXT_ENCODERS if getattr(self.pipe, p, None) is not None)
        kind = type(self.denoiser).__name__
        neg = None if negative is None else [negative] * len(prompts)
        common = dict(device=placement(encoder)[0], num_images_per_prompt=1, do_classifier_free_guidance=guided,
                      negative_prompt=neg)
        if kind == "SD3Transformer2DModel":  # (embeds, negative, pooled, negative pooled): pooled_projections
            out = self.pipe.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None, **common)
            order, extra_name = (0, 1, 2, 3), "pooled_projections"
        elif kind == "PixArtTransformer2DModel":  # (embeds, mask, negative, negative mask); its own caption cleaning off
            out = self.pipe.encode_prompt(prompt=list(prompts), clean_caption=False,
                                          **{**common, "negative_prompt": neg or ""})
            order, extra_name = (0, 2, 1, 3), "encoder_attention_mask"
        elif kind == "FluxTransformer2DModel":
            return self._flux_conditioning(list(prompts), n, negative, guidance, common["device"])
        elif kind == "UNet2DConditionModel":
            out = self.pipe.encode_prompt(prompt=list(prompts), **common)
            order, extra_name = (0, 1, 2, 3), None
        else:
            raise FlexdiffError(f"prompts for a {type(self.pipe).__name__}: flexdiff's commands encode prompts for "
                                "Stable Diffusion (1.x, 2.x, XL), PixArt, SD3 and FLUX pipelines; run this one through "
                                "diffusers with flexdiff.apply_schedule(pipe, schedule) (README: transformers)")
        out = [o.float().cpu() if torch.is_tensor(o) else o for o in out]  # kept like the noise: float32 on the CPU
        out = [out[i] if i < len(out) else None for i in order]
        rows = torch.arange(n) % len(prompts)
        embeds, neg = out[0][rows], (out[1][rows] if guided and out[1] is not None else None)
        added = neg_added = extra = neg_extra = fixed = None
        if extra_name is not None:
            extra = {extra_name: out[2][rows]}
            if guided and out[3] is not None:
                neg_extra = {extra_name: out[3][rows]}
            if kind == "PixArtTransformer2DModel":
                fixed = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
        elif self.is_sdxl:
            pooled, neg_pooled = out[2][rows], (out[3][rows] if guided and out[3] is not None else None)
            size = (self.image_size, self.image_size)
            te2 = getattr(self.pipe, "text_encoder_2", None)
            proj = int(te2.config.projection_dim) if te2 is not None else int(pooled.shape[-1])
            time_ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype,
                                                   text_encoder_projection_dim=proj)
            added = {"text_embeds": pooled, "time_ids": time_ids}
            if guided:
                neg_added = {"text_embeds": neg_pooled, "time_ids": time_ids}
        return Conditioning(encoder_hidden_states=embeds, negative=neg, guidance_scale=guidance,
                            added=added, negative_added=neg_added, extra=extra, negative_extra=neg_extra, fixed=fixed)

    def _flux_conditioning(self, prompts: list[str], n: int, negative: str | None, guidance: float, device):
        """FLUX: T5 states, CLIP's pooled projection and the text positions from its own encode_prompt. FLUX.1-dev
        takes guidance as an input (its guidance embedding: one call per step); a FLUX without it (schnell) gets
        true classifier-free guidance against `negative` (default the empty prompt), as FluxPipeline's true_cfg."""
        def enc(texts):
            embeds, pooled, ids = self.pipe.encode_prompt(prompt=texts, prompt_2=None, device=device,
                                                          num_images_per_prompt=1)
            return embeds.float().cpu(), pooled.float().cpu(), ids.float().cpu()

        rows = torch.arange(n) % len(prompts)
        embeds, pooled, ids = enc(prompts)
        extra = {"pooled_projections": pooled[rows]}
        if embeds_guidance(self.denoiser):
            extra["guidance"] = torch.full((n,), float(guidance))
            return Conditioning(encoder_hidden_states=embeds[rows], extra=extra, fixed={"txt_ids": ids})
        neg = neg_extra = None
        if guidance != 1.0:
            neg_embeds, neg_pooled, _ = enc([negative or ""] * len(prompts))
            neg, neg_extra = neg_embeds[rows], {"pooled_projections": neg_pooled[rows]}
        return Conditioning(encoder_hidden_states=embeds[rows], negative=neg, guidance_scale=guidance, extra=extra,
                            negative_extra=neg_extra, fixed={"txt_ids": ids})

    def prompt_length(self) -> int:
        """Tokens per prompt (the text length the MACs are counted on): a UNet's tokenizer length; for a
        transformer, the length its pipeline's encode_prompt makes (SD3: CLIP's 77 + T5's)."""
        if isinstance(getattr(self.pipe, "unet", None), torch.nn.Module):
            tok = getattr(self.pipe, "tokenizer", None) or getattr(self.pipe, "tokenizer_2", None)
            return int(getattr(tok, "model_max_length", 77)) if tok is not None else 77
        if self._prompt_length is None:
            self._prompt_length = int(self.encode_prompts([""], 1).encoder_hidden_states.shape[1])
        return self._prompt_length

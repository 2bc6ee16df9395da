"""Tiny random-weight diffusers transformers and their pipelines, built from configs in the test run (nothing
downloaded): DiT (class labels), PixArt (cross-attention to text), SD3 (joint blocks, flow matching) and FLUX
(dual then single blocks, flow matching). Same kinds of parts as the real ones, a few blocks each."""

import torch
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
)

TEXT_DIM = 16


def dit(layers: int = 4) -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


def pixart(layers: int = 4) -> PixArtTransformer2DModel:
    torch.manual_seed(0)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                    num_layers=layers, sample_size=8, patch_size=2, cross_attention_dim=16,
                                    caption_channels=TEXT_DIM, use_additional_conditions=False).eval()


def sd3(layers: int = 4) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                 caption_projection_dim=16, pooled_projection_dim=TEXT_DIM, pos_embed_max_size=8).eval()


def flux(layers: int = 2, single: int = 2) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                  pooled_projection_dim=TEXT_DIM, guidance_embeds=False,
                                  axes_dims_rope=(2, 2, 4)).eval()


def inputs(model, seed: int = 0, batch: int = 2, text_len: int = 5) -> dict:
    """Random keyword inputs of one call (timestep 500, or 0.5 for FLUX, whose pipeline divides by 1,000)."""
    g = torch.Generator().manual_seed(seed)
    cfg, name = model.config, type(model).__name__

    def r(*shape):
        return torch.randn(*shape, generator=g)

    if name == "FluxTransformer2DModel":
        n = 16  # a 4 x 4 grid of packed latents
        ids = torch.zeros(n, 3)
        ids[:, 1], ids[:, 2] = torch.arange(n) // 4, torch.arange(n) % 4
        return {"hidden_states": r(batch, n, cfg.in_channels), "encoder_hidden_states": r(batch, text_len, TEXT_DIM),
                "pooled_projections": r(batch, TEXT_DIM), "timestep": torch.full((batch,), 0.5),
                "img_ids": ids, "txt_ids": torch.zeros(text_len, 3)}
    kw = {"hidden_states": r(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size),
          "timestep": torch.full((batch,), 500.0)}
    if name == "DiTTransformer2DModel":
        kw["class_labels"] = torch.tensor([1, 7][:batch] + [0] * max(0, batch - 2))
    elif name == "PixArtTransformer2DModel":
        kw["encoder_hidden_states"] = r(batch, text_len, TEXT_DIM)
        kw["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    else:
        kw["encoder_hidden_states"] = r(batch, text_len, TEXT_DIM)
        kw["pooled_projections"] = r(batch, TEXT_DIM)
    return kw


MODELS = {"dit": dit, "pixart": pixart, "sd3": sd3, "flux": flux}

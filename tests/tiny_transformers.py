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
                                 num_layers=layers, sample_size=8, patch_size=2,
                                 num_embeds_ada_norm=1000).eval()  # DiTPipeline's null class is 1000


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


# --- pipelines (in memory), with tiny CLIP / T5 text encoders; a CLIP tokenizer stands in for T5's ------------

def _text_parts(folder, hidden: int = TEXT_DIM):
    from transformers import T5Config, T5EncoderModel

    from tiny_pipelines import _text_encoder, _tokenizer

    tok, vocab = _tokenizer(folder)
    torch.manual_seed(3)
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=hidden, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval()
    return tok, vocab, _text_encoder(vocab, hidden=hidden), _text_encoder(vocab, projection=True, hidden=hidden), t5


def dit_pipeline(folder):
    from diffusers import DDIMScheduler, DiTPipeline

    from flexdiff.samplers import DEFAULT_SCHEDULER_CONFIG
    from tiny_pipelines import _vae

    return DiTPipeline(transformer=dit(), vae=_vae(4), scheduler=DDIMScheduler.from_config(
        {**DEFAULT_SCHEDULER_CONFIG, "clip_sample": False}))


def pixart_pipeline(folder):
    from diffusers import DDIMScheduler, PixArtAlphaPipeline

    from flexdiff.samplers import DEFAULT_SCHEDULER_CONFIG
    from tiny_pipelines import _vae

    tok, _, _, _, t5 = _text_parts(folder)
    return PixArtAlphaPipeline(tokenizer=tok, text_encoder=t5, vae=_vae(4), transformer=pixart(),
                               scheduler=DDIMScheduler.from_config({**DEFAULT_SCHEDULER_CONFIG, "clip_sample": False}))


def sd3_pipeline(folder):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from tiny_pipelines import _vae

    tok, _, _, clip_proj, _ = _text_parts(folder)
    torch.manual_seed(4)
    clip_proj_2 = type(clip_proj)(clip_proj.config).eval()
    from transformers import T5Config, T5EncoderModel

    t5 = T5EncoderModel(T5Config(vocab_size=clip_proj.config.vocab_size, d_model=2 * TEXT_DIM, d_kv=8, d_ff=32,
                                 num_layers=1, num_heads=2)).eval()  # SD3's third encoder, as wide as the joint dim
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=2 * TEXT_DIM,
                                        caption_projection_dim=16, pooled_projection_dim=2 * TEXT_DIM,
                                        pos_embed_max_size=8).eval()
    vae = _vae(4)
    vae.register_to_config(shift_factor=0.0)  # SD3's VAE has one; img2img reads it
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=clip_proj, tokenizer=tok, text_encoder_2=clip_proj_2,
                                    tokenizer_2=tok, text_encoder_3=t5, tokenizer_3=tok)


def flux_pipeline(folder):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from tiny_pipelines import _vae

    tok, _, clip, _, t5 = _text_parts(folder)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=16, max_image_seq_len=256)
    return FluxPipeline(scheduler=sched, vae=_vae(4), text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                        tokenizer_2=tok, transformer=flux())


def run_pipeline(name: str, pipe, steps: int, seed: int = 0, guidance: float = 2.0, **extra):
    """Latents of one call of the pipeline at `steps` steps (two images, fixed generator)."""
    g = torch.Generator().manual_seed(seed)
    if name == "dit":
        return pipe(class_labels=[1, 7], num_inference_steps=steps, guidance_scale=guidance, generator=g,
                    output_type="np", **extra).images
    common = dict(num_inference_steps=steps, generator=g, output_type="latent", height=16, width=16, **extra)
    if name == "pixart":
        return pipe(["a cat", "a dog"], guidance_scale=guidance, clean_caption=False, use_resolution_binning=False,
                    max_sequence_length=8, **common).images
    if name == "sd3":
        return pipe(["a cat", "a dog"], guidance_scale=guidance, max_sequence_length=8, **common).images
    return pipe(["a cat", "a dog"], negative_prompt=["", ""], true_cfg_scale=guidance, guidance_scale=1.0,
                max_sequence_length=8, **common).images


PIPELINES = {"dit": dit_pipeline, "pixart": pixart_pipeline, "sd3": sd3_pipeline, "flux": flux_pipeline}

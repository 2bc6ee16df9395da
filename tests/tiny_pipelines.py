"""Tiny random-weight diffusers pipelines built from configs in the test run (nothing downloaded):
Stable Diffusion (CLIP text encoder + tokenizer, AutoencoderKL), SDXL (two text encoders, added
conditions), LDM (VQModel), DDPM 32x32 RGB. Same shapes of parts as the real ones, a few layers each."""

import json
import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)
from diffusers.pipelines.deprecated.latent_diffusion_uncond.pipeline_latent_diffusion_uncond import LDMPipeline

from flexdiff.samplers import DEFAULT_SCHEDULER_CONFIG

TEXT_LEN = 16  # tokens per prompt


def _tokenizer(folder: Path):
    """A CLIP tokenizer over single letters (no merges), written as the local files CLIP reads."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", "!"] + list(string.ascii_lowercase) + \
        [c + "</w>" for c in string.ascii_lowercase]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=TEXT_LEN,
                         pad_token="!"), len(tokens)


def _text_encoder(vocab: int, projection: bool = False, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(1)
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=TEXT_LEN, projection_dim=hidden,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _vae(latent_channels: int = 4):
    torch.manual_seed(2)
    return AutoencoderKL(block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=16).eval()


def _scheduler():
    return DDIMScheduler.from_config({**DEFAULT_SCHEDULER_CONFIG, "clip_sample": False})


def _cond_unet(cross_dim: int, **extra):
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=4, cross_attention_dim=cross_dim,
                                attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **extra).eval()


def stable_diffusion(folder: Path) -> Path:
    tok, vocab = _tokenizer(folder.parent / f"{folder.name}-tokenizer-files")
    StableDiffusionPipeline(vae=_vae(), text_encoder=_text_encoder(vocab), tokenizer=tok, unet=_cond_unet(32),
                            scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


def sdxl(folder: Path) -> Path:
    tok, vocab = _tokenizer(folder.parent / f"{folder.name}-tokenizer-files")
    unet = _cond_unet(64, addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=6 * 8 + 32)
    StableDiffusionXLPipeline(vae=_vae(), text_encoder=_text_encoder(vocab), text_encoder_2=_text_encoder(vocab, True),
                              tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=_scheduler()).save_pretrained(folder)
    return folder


def ldm(folder: Path) -> Path:
    torch.manual_seed(3)
    vq = VQModel(block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=3, num_vq_embeddings=16,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 norm_num_groups=4, sample_size=16).eval()
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4).eval()
    LDMPipeline(vqvae=vq, unet=unet, scheduler=_scheduler()).save_pretrained(folder)
    return folder


def ddpm_rgb(folder: Path) -> Path:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4).eval()
    DDPMPipeline(unet=unet, scheduler=_scheduler()).save_pretrained(folder)
    return folder


def class_conditional(folder: Path) -> Path:
    """A class-conditional UNet2DModel (4 classes + the null label), 3x32x32, as a UNet folder."""
    from flexdiff.models import save_model

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"), num_class_embeds=5,
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4).eval()
    return save_model(unet, {**DEFAULT_SCHEDULER_CONFIG, "clip_sample": False}, folder)


def clip_model(folder: Path) -> Path:
    """A tiny CLIP model and processor (the letters tokenizer, 16x16 images), saved as --clip-model reads it."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok, vocab = _tokenizer(folder.parent / f"{folder.name}-tokenizer-files")
    cfg = CLIPConfig(text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=TEXT_LEN, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=2),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                        image_size=16, patch_size=4), projection_dim=16)
    torch.manual_seed(4)
    CLIPModel(cfg).save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=processor, tokenizer=tok).save_pretrained(folder)
    return folder


BUILDERS = dict(sd=stable_diffusion, sdxl=sdxl, ldm=ldm, ddpm=ddpm_rgb, classcond=class_conditional)
IMAGE = dict(sd=(3, 16, 16), sdxl=(3, 16, 16), ldm=(3, 16, 16), ddpm=(3, 32, 32), classcond=(3, 32, 32))
# what each kind is conditioned on in the CLI tests
CONDITION = dict(sd=("--prompt", "a cat", "--prompt", "a dog", "--guidance", 2),
                 sdxl=("--prompt", "a cat", "--prompt", "a dog", "--guidance", 2),
                 classcond=("--labels", "0,3", "--guidance", 2), ldm=(), ddpm=())


def stable_diffusion_controlnet(folder: Path) -> Path:
    """Stable Diffusion with a ControlNet made from its UNet (image embedding stride 2, as the tiny VAE's)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    tok, vocab = _tokenizer(folder.parent / f"{folder.name}-tokenizer-files")
    unet = _cond_unet(32)
    torch.manual_seed(3)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8)).eval()
    with torch.no_grad():  # from_unet zero-initialises the output convolutions: make the control do something
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                     controlnet.controlnet_cond_embedding.conv_out]:
            conv.weight.normal_(0, 0.3)
    StableDiffusionControlNetPipeline(vae=_vae(), text_encoder=_text_encoder(vocab), tokenizer=tok, unet=unet,
                                      controlnet=controlnet, scheduler=_scheduler(), safety_checker=None,
                                      feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    return folder

"""Where a denoiser can be cut for a partial step: one interface, one anatomy per model family.

`anatomy(model)` returns the model's anatomy: its number of branches, the hooks that make a partial step
at a branch (installed by the engine), the size of the cache they use, and where a call's timestep is.
A UNet's is here; a transformer's (a block stack, cut around its middle) is in transformer_anatomy.py.

UNet (DeepCache, Ma et al. CVPR 2024): the down path produces skip tensors s_0 (conv_in) ... s_{K-1};
the up path consumes them in reverse. A *unit* is a group of modules run or skipped together, tagged with
the depth of the skip tensor it touches; a partial step at branch b runs the units of depth <= b and takes
every deeper one (and the mid block) from the cache of the last full step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.hooks import ModelHook

from .errors import FlexdiffError
from .mixture import experts_of
from .schedule import StepKind
from .transformer_anatomy import TransformerAnatomy, is_transformer, supported_names, transformer_anatomy


@dataclass
class Unit:
    """A group of modules that is skipped or run together; `depth` = index of the skip tensor it touches."""

    name: str
    modules: list[torch.nn.Module]
    depth: int


class _CacheHook(ModelHook):
    """On a UNet unit or block: record its output at full steps, return that record when a partial step skips it."""

    def __init__(self, engine, key: int, depth: int):
        super().__init__()
        self.engine, self.key, self.depth = engine, key, depth

    def new_forward(self, module, *args, **kwargs):
        run = self.engine.run
        if run.mode is StepKind.PARTIAL and self.depth > run.branch:
            return run.cache[run.slot][self.key]
        out = self.fn_ref.original_forward(*args, **kwargs)
        if run.mode is StepKind.FULL:
            run.cache[run.slot][self.key] = out
        return out


@dataclass
class UNetAnatomy:
    """Where partial steps may cut a UNet: its units, its blocks, and the number of branches."""

    model: torch.nn.Module
    units: list[Unit]
    blocks: list[Unit]  # whole blocks, with depth = the shallowest depth inside them
    num_branches: int

    @property
    def cache_keys(self) -> int:
        return sum(len(u.modules) for g in (self.units, self.blocks) for u in g)

    def branch_name(self, b: int) -> str:
        return f"skip depth <= {b}"

    def feature_site(self):
        """Where the deepest features are (the mid block, else the last down block), and how to read them from
        its output: what the timestep-similarity measure compares."""
        m = self.model
        site = m.mid_block if getattr(m, "mid_block", None) is not None else m.down_blocks[-1]
        return site, lambda out: out[0] if isinstance(out, tuple) else out

    @staticmethod
    def timestep(args, kwargs):
        """The timestep a UNet is called at: its second positional argument or `timestep`."""
        return args[1] if len(args) > 1 else kwargs["timestep"]

    @staticmethod
    def call_inputs(x: torch.Tensor, t: torch.Tensor, conditioning: dict | None = None) -> dict:
        """The image and timestep inputs of one call on x (N, C, H, W) at timestep t."""
        return {"sample": x, "timestep": t}

    @staticmethod
    def call_output(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return out

    @staticmethod
    def image_tokens(shape: tuple[int, ...]) -> int:
        return shape[-2] * shape[-1]

    def latent_channels(self) -> int:
        return int(self.model.config.in_channels)

    def example_inputs(self, context_len: int = 77) -> dict:
        """Keyword inputs of one call on one image (on the CPU, float32): what MACs are counted on."""
        cfg = self.model.config
        kwargs = {"sample": torch.zeros(1, cfg.in_channels, cfg.sample_size, cfg.sample_size),
                  "timestep": torch.tensor([500])}
        if type(self.model).__name__ == "UNet2DConditionModel":
            kwargs["encoder_hidden_states"] = torch.zeros(1, context_len, cfg.cross_attention_dim)
            if getattr(cfg, "addition_embed_type", None) == "text_time":  # SDXL: pooled text + 6 size/crop ids
                text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
                kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, text_dim), "time_ids": torch.zeros(1, 6)}
        elif getattr(cfg, "num_class_embeds", None) is not None:
            kwargs["class_labels"] = torch.zeros(1, dtype=torch.long)
        return kwargs

    def hooks(self, engine, first_key: int) -> list[tuple[torch.nn.Module, ModelHook]]:
        out = []
        for group in (self.units, self.blocks):
            for unit in group:
                for module in unit.modules:
                    out.append((module, _CacheHook(engine, first_key + len(out), unit.depth)))
        return out


Anatomy = UNetAnatomy | TransformerAnatomy


def _block_units(prefix: str, block: torch.nn.Module, depth: int, step: int) -> tuple[list[Unit], int]:
    """Split a diffusers down/up block into units: (resnet [+attention] [+upsampler]) per skip tensor."""
    resnets = list(block.resnets)
    attentions = list(getattr(block, "attentions", None) or [])
    units = []
    for k, resnet in enumerate(resnets):
        mods = [resnet] + ([attentions[k]] if k < len(attentions) else [])
        if step < 0 and k == len(resnets) - 1 and getattr(block, "upsamplers", None):
            mods += list(block.upsamplers)  # feeds the next up block: cached with this resnet
        units.append(Unit(f"{prefix}.resnets.{k}", mods, depth))
        depth += step
    if step > 0 and getattr(block, "downsamplers", None):
        units.append(Unit(f"{prefix}.downsamplers", list(block.downsamplers), depth))
        depth += step
    return units, depth


def anatomy(model: torch.nn.Module) -> Anatomy:
    """The anatomy of a diffusers UNet or transformer denoiser (or of the one a torch.compile wrapper holds);
    anything else is refused, naming what is supported."""
    model = getattr(model, "_orig_mod", model)
    if is_transformer(model):
        return transformer_anatomy(model)
    return unet_anatomy(model)


def unet_anatomy(unet: torch.nn.Module) -> UNetAnatomy:
    """Find the cache units of a diffusers UNet2DModel / UNet2DConditionModel."""
    for name in ("conv_in", "down_blocks", "up_blocks"):
        if not hasattr(unet, name):
            raise FlexdiffError(f"{type(unet).__name__} cannot be cut by flexdiff (no {name}); supported "
                                f"denoisers: UNet2DModel, UNet2DConditionModel, {supported_names()}")
    if any(hasattr(b, "skip_conv") for b in list(unet.down_blocks) + list(unet.up_blocks)):
        raise FlexdiffError("UNets with skip-sample blocks (AttnSkipDownBlock2D ...) are not supported")
    units, blocks = [], []
    depth = 1  # s_0 is conv_in's output, always computed
    for j, block in enumerate(unet.down_blocks):
        first = depth
        bu, depth = _block_units(f"down_blocks.{j}", block, depth, +1)
        units += bu
        blocks.append(Unit(f"down_blocks.{j}", [block], first))
    num_branches = depth
    up_consumed = sum(len(b.resnets) for b in unet.up_blocks)
    if up_consumed != num_branches:
        raise FlexdiffError(
            f"unsupported UNet layout: the down path makes {num_branches} skip tensors, "
            f"the up path consumes {up_consumed}"
        )
    if getattr(unet, "mid_block", None) is not None:
        # the mid block is one unit, hooked once (as a block): every partial step skips it
        blocks.append(Unit("mid_block", [unet.mid_block], num_branches))
    depth = num_branches - 1
    for j, block in enumerate(unet.up_blocks):
        bu, depth = _block_units(f"up_blocks.{j}", block, depth, -1)
        units += bu
        blocks.append(Unit(f"up_blocks.{j}", [block], min(u.depth for u in bu)))
    return UNetAnatomy(model=unet, units=units, blocks=blocks, num_branches=num_branches)


def call_anatomy(model: torch.nn.Module) -> Anatomy:
    """The anatomy whose call convention a sampling loop follows (a mixture: its first expert's, all alike)."""
    return anatomy(experts_of(model)[0])


def noise_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of the latents (or pixels) the denoiser samples: its channels and sample size (FLUX, which has no
    sample size in its config: the one its pipeline uses, `flexdiff_latent_size`, 1,024 px by default)."""
    first = experts_of(model)[0]
    size = getattr(first.config, "sample_size", None) or getattr(first, "flexdiff_latent_size", 128)
    return (call_anatomy(first).latent_channels(), int(size), int(size))


def num_branches(unet: torch.nn.Module) -> int:
    """Cache branches a schedule may use on `unet` (on a mixture: those every expert has)."""
    return min(anatomy(m).num_branches for m in experts_of(unet))

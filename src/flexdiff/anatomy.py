"""UNet anatomy: where a diffusers UNet can be cut for a partial step.

The down path produces skip tensors s_0 (conv_in) ... s_{K-1}; the up path consumes them in
reverse. A *unit* is a group of modules run or skipped together, tagged with the depth of the
skip tensor it touches; a partial step at branch b runs the units of depth <= b and takes every
deeper one (and the mid block) from the cache of the last full step. The engine hooks these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import FlexdiffError
from .mixture import experts_of


@dataclass
class Unit:
    """A group of modules that is skipped or run together; `depth` = index of the skip tensor it touches."""

    name: str
    modules: list[torch.nn.Module]
    depth: int


@dataclass
class UNetAnatomy:
    """Where partial steps may cut a UNet: its units, its blocks, and the number of branches."""

    units: list[Unit]
    blocks: list[Unit]  # whole blocks, with depth = the shallowest depth inside them
    num_branches: int


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


def anatomy(unet: torch.nn.Module) -> UNetAnatomy:
    """Find the cache units of a diffusers UNet2DModel / UNet2DConditionModel."""
    for name in ("conv_in", "down_blocks", "up_blocks"):
        if not hasattr(unet, name):
            raise FlexdiffError(f"{type(unet).__name__} is not a diffusers UNet (no {name})")
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
    return UNetAnatomy(units=units, blocks=blocks, num_branches=num_branches)


def num_branches(unet: torch.nn.Module) -> int:
    """Cache branches a schedule may use on `unet` (on a mixture: those every expert has)."""
    return min(anatomy(m).num_branches for m in experts_of(unet))

"""Walking a diffusers UNet for the elastic network: every parameter of a sub-network, paired with
its full parameter and the channel layout of each of its dims (which stage's channels, where
tensors were concatenated), plus the GroupNorms and identity shortcuts that constrain cutting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DModel

from ..errors import FlexdiffError
from ..mixture import SubnetSpec, layers_per_stage


def _time_embed_dim(unet) -> int:
    return unet.time_embedding.linear_2.out_features


def subnet_config(unet, spec: SubnetSpec) -> dict:
    """The rewritten diffusers config of the static sub-network."""
    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    cfg["block_out_channels"] = list(spec.widths)
    if len(set(spec.depths)) == 1:
        cfg["layers_per_block"] = spec.depths[0]
    elif isinstance(unet, UNet2DModel):
        raise FlexdiffError(
            f"depths {list(spec.depths)}: a UNet2DModel has one layers_per_block for all stages; "
            "give every stage the same depth"
        )
    else:
        cfg["layers_per_block"] = list(spec.depths)
    cfg["time_embedding_dim"] = _time_embed_dim(unet)  # keep the time embedding's size
    return cfg


def attention_is_plain(attn) -> bool:
    """diffusers' `Attention` (self-attention with residual), not a Transformer2DModel."""
    return hasattr(attn, "to_q") and hasattr(attn, "to_out")


# A dim's layout: a list of (space, full size) segments (several when tensors were concatenated),
# or None when the dim is never cut. Spaces: ("s", i) = channels of stage i, ("inner", name) =
# the query/key/value dims of one attention module.
Segments = list[tuple[tuple, int]] | None


@dataclass(frozen=True)
class ParamRow:
    """A sub-network parameter `sub`, sliced from the full parameter `full` along each dim's layout."""

    sub: str
    full: str
    dims: tuple[Segments, ...]


@dataclass(frozen=True)
class IdentityRow:
    """An identity shortcut between two stages: a sub-network where their widths differ gets a 1x1
    convolution `sub` that selects the channels the two stages keep in common."""

    sub: str
    inp: tuple  # the channel space of the input stage
    out: tuple  # and of the output stage


@dataclass(frozen=True)
class WholeRow:
    """A module whose inner layout is never cut (a cross-attention transformer): copied whole."""

    sub: str
    full: str
    stage: int


Row = ParamRow | IdentityRow | WholeRow


def segment_index(segs: list[tuple[tuple, int]], pick) -> torch.Tensor:
    """One index tensor over a dim made of segments: `pick(space, size)` indexes inside each one."""
    parts, offset = [], 0
    for space, size in segs:
        parts.append(pick(space, size) + offset)
        offset += size
    return torch.cat(parts)


class Walker:
    """Pairs every parameter of a sub-network with its full parameter and the layout of its dims."""

    def __init__(self, full, spec: SubnetSpec):
        self.full, self.spec = full, spec
        self.ch = tuple(full.config.block_out_channels)
        self.layers = layers_per_stage(full.config)
        self.rows: list[Row] = []
        self.links: list[tuple[int, int]] = []  # stages joined by an identity shortcut
        self.norms: list[tuple[Segments, int]] = []  # every GroupNorm: its layout and group count

    def s(self, i: int) -> Segments:
        return [(("s", i), self.ch[i])]

    def add(self, sub: str, full: str, *dims: Segments) -> None:
        self.rows.append(ParamRow(sub, full, dims))

    def conv(self, sub, full, out: Segments, inp: Segments, module) -> None:
        self.add(f"{sub}.weight", f"{full}.weight", out, inp)
        if module.bias is not None:
            self.add(f"{sub}.bias", f"{full}.bias", out)

    def norm(self, sub, full, seg: Segments, groups: int | None = None) -> None:
        if groups is not None:
            self.norms.append((seg, groups))
        self.add(f"{sub}.weight", f"{full}.weight", seg)
        self.add(f"{sub}.bias", f"{full}.bias", seg)

    def resnet(self, sub, full, r, inp: Segments, out: Segments) -> None:
        self.norm(f"{sub}.norm1", f"{full}.norm1", inp, r.norm1.num_groups)
        self.conv(f"{sub}.conv1", f"{full}.conv1", out, inp, r.conv1)
        if r.time_emb_proj is not None:
            self.conv(f"{sub}.time_emb_proj", f"{full}.time_emb_proj", out, None, r.time_emb_proj)
        self.norm(f"{sub}.norm2", f"{full}.norm2", out, r.norm2.num_groups)
        self.conv(f"{sub}.conv2", f"{full}.conv2", out, out, r.conv2)
        if r.conv_shortcut is not None:
            self.conv(f"{sub}.conv_shortcut", f"{full}.conv_shortcut", out, inp, r.conv_shortcut)
        elif inp != out:
            # an identity shortcut joins two stages into one channel space: they share one ordering, and a
            # sub-network where their widths differ gets a 1x1 shortcut that selects the common channels
            self.links.append((inp[0][0][1], out[0][0][1]))
            self.rows.append(IdentityRow(f"{sub}.conv_shortcut", inp[0][0], out[0][0]))

    def attention(self, sub, full, a, stage: int) -> None:
        seg = self.s(stage)
        if not attention_is_plain(a):
            # cross-attention transformers: their inner layouts are not cut; the stage must stay whole
            self.rows.append(WholeRow(sub, full, stage))
            return
        inner = [(("inner", full), a.to_q.out_features)]
        if a.group_norm is not None:
            self.norm(f"{sub}.group_norm", f"{full}.group_norm", seg, a.group_norm.num_groups)
        for name in ("to_q", "to_k", "to_v"):
            self.conv(f"{sub}.{name}", f"{full}.{name}", inner, seg, getattr(a, name))
        self.conv(f"{sub}.to_out.0", f"{full}.to_out.0", seg, inner, a.to_out[0])

    def walk(self) -> "Walker":
        f, n = self.full, len(self.ch)
        depths = self.spec.depths
        self.conv("conv_in", "conv_in", self.s(0), None, f.conv_in)
        for i, block in enumerate(f.down_blocks):
            inp = self.s(max(i - 1, 0))
            attns = list(getattr(block, "attentions", None) or [])
            for k in range(depths[i]):
                self.resnet(f"down_blocks.{i}.resnets.{k}", f"down_blocks.{i}.resnets.{k}", block.resnets[k],
                            inp if k == 0 else self.s(i), self.s(i))
                if k < len(attns):
                    self.attention(f"down_blocks.{i}.attentions.{k}", f"down_blocks.{i}.attentions.{k}", attns[k], i)
            if getattr(block, "downsamplers", None):
                self.conv(f"down_blocks.{i}.downsamplers.0.conv", f"down_blocks.{i}.downsamplers.0.conv",
                          self.s(i), self.s(i), block.downsamplers[0].conv)
        mid = getattr(f, "mid_block", None)
        if mid is not None:
            for k, r in enumerate(mid.resnets):
                self.resnet(f"mid_block.resnets.{k}", f"mid_block.resnets.{k}", r, self.s(n - 1), self.s(n - 1))
            for k, a in enumerate(getattr(mid, "attentions", None) or []):
                if a is not None:
                    self.attention(f"mid_block.attentions.{k}", f"mid_block.attentions.{k}", a, n - 1)
        for j, block in enumerate(f.up_blocks):
            i = n - 1 - j
            full_n, d = self.layers[i], depths[i]
            attns = list(getattr(block, "attentions", None) or [])
            prev = self.s(min(i + 1, n - 1))
            for m in range(d + 1):
                fm = 0 if m == 0 else m + full_n - d  # which full ResNet this one is
                hidden = prev if fm == 0 else self.s(i)
                skip = self.s(i) if fm < full_n else self.s(max(i - 1, 0))
                self.resnet(f"up_blocks.{j}.resnets.{m}", f"up_blocks.{j}.resnets.{fm}", block.resnets[fm],
                            hidden + skip, self.s(i))
                if fm < len(attns):
                    self.attention(f"up_blocks.{j}.attentions.{m}", f"up_blocks.{j}.attentions.{fm}", attns[fm], i)
            if getattr(block, "upsamplers", None):
                self.conv(f"up_blocks.{j}.upsamplers.0.conv", f"up_blocks.{j}.upsamplers.0.conv",
                          self.s(i), self.s(i), block.upsamplers[0].conv)
        if f.conv_norm_out is not None:
            self.norm("conv_norm_out", "conv_norm_out", self.s(0), f.conv_norm_out.num_groups)
        self.conv("conv_out", "conv_out", None, self.s(0), f.conv_out)
        return self

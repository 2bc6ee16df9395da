"""Elastic UNets: one full set of weights, run or cut out at a smaller width and depth.

Once-for-all style (Cai et al. ICLR 2020): the elastic network owns the full weights; a
sub-network is a *static* diffusers UNet of the same class, built from a rewritten config
(`block_out_channels`, `layers_per_block`), whose parameters are slices of the full ones.
Running the elastic network at a setting is `torch.func.functional_call` of that static
architecture with the sliced tensors, so gradients reach the full weights and the extracted
model is, by construction of the same slices, the same function. No diffusers code is forked.

Width: each stage's channels (one entry of `block_out_channels`). Channels are first re-ordered
by importance *within each GroupNorm group* (which keeps the function at full size, since
group membership is unchanged); a sub-network keeps the first `w / G` channels of every group,
so its GroupNorm groups are subsets of the teacher's groups. Stage 0 keeps its full width:
diffusers ties the sinusoidal timestep embedding's size to `block_out_channels[0]`.

Depth: `layers_per_block` per stage. A down stage keeps its first `d` ResNets; its up stage
keeps the first ResNet (whose input comes from the stage below) and the last `d`, which
consume the skips of the kept down ResNets and of the stage's input.
"""

from __future__ import annotations

import copy
import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from torch.func import functional_call

from ..errors import FlexdiffError


@dataclass(frozen=True)
class SubnetSpec:
    """A sub-network: channels per stage and ResNets per down stage (plain data, JSON round-trip)."""

    widths: tuple[int, ...]
    depths: tuple[int, ...]

    def to_dict(self) -> dict:
        return dict(widths=list(self.widths), depths=list(self.depths))

    @classmethod
    def from_dict(cls, d: dict, where: str = "spec") -> "SubnetSpec":
        try:
            return cls(tuple(int(w) for w in d["widths"]), tuple(int(x) for x in d["depths"]))
        except (KeyError, TypeError, ValueError) as e:
            raise FlexdiffError(f"{where}: a sub-network needs integer lists 'widths' and 'depths' ({e})") from None

    def label(self) -> str:
        return "w" + "-".join(map(str, self.widths)) + ("/d" + "-".join(map(str, self.depths)))


def _layers(cfg) -> tuple[int, ...]:
    lpb = cfg.layers_per_block
    n = len(cfg.block_out_channels)
    return tuple(lpb) if isinstance(lpb, (list, tuple)) else (int(lpb),) * n


def full_spec(unet) -> SubnetSpec:
    return SubnetSpec(tuple(unet.config.block_out_channels), _layers(unet.config))


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


def _attention_is_plain(attn) -> bool:
    """diffusers' `Attention` (self-attention with residual), not a Transformer2DModel."""
    return hasattr(attn, "to_q") and hasattr(attn, "to_out")


# A dim's layout: a list of (space, full size) segments (several when tensors were concatenated),
# or None when the dim is never cut. Spaces: ("s", i) = channels of stage i, ("inner", name) =
# the query/key/value dims of one attention module.
Segments = list[tuple[tuple, int]] | None


class _Walker:
    """Pairs every parameter of a sub-network with its full parameter and the layout of its dims."""

    def __init__(self, full, spec: SubnetSpec):
        self.full, self.spec = full, spec
        self.ch = tuple(full.config.block_out_channels)
        self.layers = _layers(full.config)
        self.rows: list[tuple[str, str, tuple[Segments, ...]]] = []
        self.links: list[tuple[int, int]] = []  # stages joined by an identity shortcut
        self.norms: list[tuple[Segments, int]] = []  # every GroupNorm: its layout and group count

    def s(self, i: int) -> Segments:
        return [(("s", i), self.ch[i])]

    def add(self, sub: str, full: str, *dims: Segments) -> None:
        self.rows.append((sub, full, dims))

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
            self.rows.append((f"{sub}.conv_shortcut", None, ("identity", inp[0][0], out[0][0])))

    def attention(self, sub, full, a, stage: int) -> None:
        seg = self.s(stage)
        if not _attention_is_plain(a):
            # cross-attention transformers: their inner layouts are not cut; the stage must stay whole
            self.rows.append((sub, full, ("whole", stage)))
            return
        inner = [(("inner", full), a.to_q.out_features)]
        if a.group_norm is not None:
            self.norm(f"{sub}.group_norm", f"{full}.group_norm", seg, a.group_norm.num_groups)
        for name in ("to_q", "to_k", "to_v"):
            self.conv(f"{sub}.{name}", f"{full}.{name}", inner, seg, getattr(a, name))
        self.conv(f"{sub}.to_out.0", f"{full}.to_out.0", seg, inner, a.to_out[0])

    def walk(self) -> "_Walker":
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


class ElasticUNet(torch.nn.Module):
    """A diffusers UNet made elastic in width and depth; `forward(..., spec=...)` runs a sub-network."""

    def __init__(self, unet: UNet2DModel | UNet2DConditionModel):
        super().__init__()
        if not isinstance(unet, (UNet2DModel, UNet2DConditionModel)):
            raise FlexdiffError(f"{type(unet).__name__}: elastic experts need a UNet2DModel or UNet2DConditionModel")
        self.unet = unet
        self.groups = int(unet.config.norm_num_groups)
        self._templates: OrderedDict[SubnetSpec, torch.nn.Module] = OrderedDict()
        self._plans: dict[SubnetSpec, list] = {}
        self.full = full_spec(unet)
        walker = _Walker(unet, self.full).walk()
        self._whole_stages = {row[2][1] for row in walker.rows if row[2][:1] == ("whole",)}
        self._links = walker.links
        self._cells = self._norm_cells(walker)

    def _norm_cells(self, walker: "_Walker") -> dict[int, list[int]]:
        """Per stage, the boundaries of the finest partition that no GroupNorm group crosses.

        A channel may move only inside its cell: then every GroupNorm (including those over
        concatenated skips, whose groups are cut at other offsets) sees the same groups.
        """
        bounds = {i: {0, c} for i, c in enumerate(self.full.widths)}
        for segs, groups in walker.norms:
            total = sum(size for _, size in segs)
            cuts = {total * g // groups for g in range(groups + 1)}
            offset = 0
            for space, size in segs:
                if space[0] == "s":
                    bounds[space[1]] |= {c - offset for c in cuts if offset <= c <= offset + size}
                offset += size
        for _ in walker.links:  # stages joined by identity shortcuts are one space: one partition
            for a, b in walker.links:
                bounds[a] = bounds[b] = bounds[a] | bounds[b]
        return {i: sorted(b) for i, b in bounds.items()}

    # ---- the space of sub-networks
    def width_choices(self, stage: int) -> list[int]:
        """Widths a stage may take: multiples of the GroupNorm group count (one channel per group and up)."""
        c = self.full.widths[stage]
        if stage == 0 or stage in self._whole_stages:
            return [c]
        steps = [self.groups * k for k in range(1, c // self.groups + 1)]
        head = self._min_attention_width(stage)
        return [w for w in steps if w >= head] or [c]

    def _min_attention_width(self, stage: int) -> int:
        hd = getattr(self.unet.config, "attention_head_dim", None)
        has_attn = any(_attention_is_plain(a) for a in self._stage_attentions(stage))
        return int(hd) if (has_attn and isinstance(self.unet, UNet2DModel) and hd) else 0

    def _stage_attentions(self, stage: int):
        n = len(self.full.widths)
        blocks = [self.unet.down_blocks[stage], self.unet.up_blocks[n - 1 - stage]]
        out = [a for b in blocks for a in (getattr(b, "attentions", None) or [])]
        if stage == n - 1 and getattr(self.unet, "mid_block", None) is not None:
            out += [a for a in (getattr(self.unet.mid_block, "attentions", None) or []) if a is not None]
        return out

    def depth_choices(self, stage: int) -> list[int]:
        return list(range(1, self.full.depths[stage] + 1))

    def depth_options(self) -> list[tuple[int, ...]]:
        """Depth settings: per stage for UNet2DConditionModel, one shared depth for UNet2DModel."""
        if isinstance(self.unet, UNet2DModel):
            return [(d,) * len(self.full.depths) for d in range(1, min(self.full.depths) + 1)] \
                if len(set(self.full.depths)) == 1 else [self.full.depths]
        return list(itertools.product(*(self.depth_choices(i) for i in range(len(self.full.depths)))))

    def validate(self, spec: SubnetSpec, where: str = "spec") -> None:
        n = len(self.full.widths)
        if len(spec.widths) != n or len(spec.depths) != n:
            raise FlexdiffError(f"{where}: this UNet has {n} stages; got widths {list(spec.widths)}, "
                                f"depths {list(spec.depths)}")
        for i, w in enumerate(spec.widths):
            if w not in self.width_choices(i):
                raise FlexdiffError(f"{where}: width {w} for stage {i}; accepted: {self.width_choices(i)}")
        if spec.depths not in self.depth_options():
            raise FlexdiffError(f"{where}: depths {list(spec.depths)}; accepted: {[list(d) for d in self.depth_options()]}")

    def smallest(self) -> SubnetSpec:
        n = len(self.full.widths)
        return SubnetSpec(tuple(self.width_choices(i)[0] for i in range(n)), min(self.depth_options()))

    def random_spec(self, gen: torch.Generator) -> SubnetSpec:
        def pick(xs):
            return xs[int(torch.randint(len(xs), (1,), generator=gen))]
        n = len(self.full.widths)
        return SubnetSpec(tuple(pick(self.width_choices(i)) for i in range(n)), pick(self.depth_options()))

    def all_specs(self) -> Iterator[SubnetSpec]:
        n = len(self.full.widths)
        for ws in itertools.product(*(self.width_choices(i) for i in range(n))):
            for ds in self.depth_options():
                yield SubnetSpec(tuple(ws), tuple(ds))

    # ---- slicing
    def _keep(self, spec: SubnetSpec) -> dict:
        """Indices kept in every space: the first w/G channels of each group; a prefix of attention heads."""
        keep = {}
        for i, (w, c) in enumerate(zip(spec.widths, self.full.widths)):
            gs, k = c // self.groups, w // self.groups
            keep[("s", i)] = (torch.arange(self.groups)[:, None] * gs + torch.arange(k)[None, :]).reshape(-1)
        return keep

    def plan(self, spec: SubnetSpec) -> list:
        if spec not in self._plans:
            self.validate(spec)
            template = self.template(spec)
            keep = self._keep(spec)
            sub_params = dict(template.named_parameters())
            rows = []
            for sub, full, dims in _Walker(self.unet, spec).walk().rows:
                if dims[:1] == ("identity",):
                    if f"{sub}.weight" in sub_params:
                        rows.append((sub, None, (keep[dims[1]], keep[dims[2]])))
                    continue
                if dims[:1] == ("whole",):
                    prefix_s, prefix_f = sub + ".", full + "."
                    for name in sub_params:
                        if name.startswith(prefix_s):
                            rows.append((name, prefix_f + name[len(prefix_s):], None))
                    continue
                if sub not in sub_params:
                    # a learned shortcut between stages cut to equal widths: diffusers builds an identity there
                    continue
                idx = []
                for d, segs in enumerate(dims):
                    if segs is None:
                        idx.append(None)
                        continue
                    parts, offset = [], 0
                    for space, size in segs:
                        kept = keep.get(space)
                        if kept is None:  # attention inner dims: a prefix, as long as the template's
                            kept = torch.arange(sub_params[sub].shape[d])
                        parts.append(kept + offset)
                        offset += size
                    cat = torch.cat(parts)
                    idx.append(None if len(cat) == offset and torch.equal(cat, torch.arange(offset)) else cat)
                rows.append((sub, full, idx))
            names = {r[0] for r in rows}
            full_params = dict(self.unet.named_parameters())
            for name in set(sub_params) - names:  # layers no cut touches (time embedding ...)
                if name in full_params and full_params[name].shape == sub_params[name].shape:
                    rows.append((name, name, None))
            covered = {r[0] for r in rows} | {f"{r[0]}.{p}" for r in rows if r[1] is None for p in ("weight", "bias")}
            missing = set(sub_params) - covered
            if missing:
                raise FlexdiffError(f"elastic UNet: unsupported layers {sorted(missing)[:3]}")
            self._plans[spec] = rows
        return self._plans[spec]

    def sub_state(self, spec: SubnetSpec) -> dict[str, torch.Tensor]:
        """The sub-network's parameters, as differentiable slices of the full ones."""
        full = dict(self.unet.named_parameters())
        out = {}
        for sub, name, idx in self.plan(spec):
            if name is None:  # a selecting 1x1 shortcut where the full model adds its input unchanged
                kin, kout = idx
                w = (kout[:, None] == kin[None, :]).to(next(iter(full.values())).dtype)
                out[f"{sub}.weight"] = w[:, :, None, None]
                out[f"{sub}.bias"] = torch.zeros(len(kout))
                continue
            t = full[name]
            for d, ix in enumerate(idx or ()):
                if ix is not None:
                    t = t.index_select(d, ix)
            out[sub] = t
        return out

    def template(self, spec: SubnetSpec):
        if spec not in self._templates:
            cls = type(self.unet)
            with torch.random.fork_rng():  # building a module must not move the caller's random stream
                tmpl = cls.from_config(subnet_config(self.unet, spec))
            tmpl.requires_grad_(False).train(self.unet.training)
            self._templates[spec] = tmpl
            if len(self._templates) > 256:
                self._templates.popitem(last=False)
        else:
            self._templates.move_to_end(spec)
        return self._templates[spec]

    def forward(self, sample, timestep, *args, spec: SubnetSpec | None = None, **kwargs):
        if spec is None or spec == self.full:
            return self.unet(sample, timestep, *args, **kwargs)
        tmpl = self.template(spec)
        tmpl.train(self.unet.training)
        return functional_call(tmpl, self.sub_state(spec), (sample, timestep, *args), kwargs)

    @torch.no_grad()
    def extract(self, spec: SubnetSpec):
        """The static sub-network: a plain diffusers UNet with a rewritten config and copied weights."""
        model = copy.deepcopy(self.template(spec))
        model.load_state_dict({k: v.detach().clone() for k, v in self.sub_state(spec).items()}, strict=True)
        return model.eval()

    # ---- importance re-ordering
    def _tied(self, scores: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Stages joined by identity shortcuts are one channel space: give them one summed score."""
        groups = {i: {i} for i in range(len(self.full.widths))}
        for a, b in self._links:
            merged = groups[a] | groups[b]
            for i in merged:
                groups[i] = merged
        out = {}
        for i in groups:
            parts = [scores[j] for j in sorted(groups[i]) if j in scores]
            if parts:
                out[i] = torch.stack(parts).sum(0)
        return out

    @torch.no_grad()
    def reorder(self, scores: dict[int, torch.Tensor]) -> None:
        """Sort each stage's channels by importance inside every GroupNorm group (function unchanged)."""
        perms = {}
        scores = self._tied(scores)
        frozen = self._tied({i: torch.ones(1) for i in self._whole_stages | {0}})
        for i, c in enumerate(self.full.widths):
            sc = scores.get(i)
            if sc is None or i in frozen:  # stage 0 and transformer stages keep their order
                perms[("s", i)] = torch.arange(c)
                continue
            cells = self._cells[i]
            perms[("s", i)] = torch.cat([
                a + torch.argsort(-sc[a:b], stable=True) for a, b in zip(cells[:-1], cells[1:])
            ])
        params = dict(self.unet.named_parameters())
        new = {}
        for sub, full, dims in _Walker(self.unet, self.full).walk().rows:
            if dims[:1] in (("whole",), ("identity",)):
                continue
            t = params[full]
            for d, segs in enumerate(dims):
                if segs is None:
                    continue
                parts, offset = [], 0
                for space, size in segs:
                    parts.append(perms.get(space, torch.arange(size)) + offset)
                    offset += size
                t = t.index_select(d, torch.cat(parts))
            new[full] = t.clone()
        for name, t in new.items():
            params[name].copy_(t)
        self._plans.clear()


def stage_scores(elastic: ElasticUNet, grads: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """First-order Taylor importance per channel of each stage: sum of |w * dL/dw| over its parameters.

    `grads` maps full parameter names to accumulated |w * grad| tensors (Molchanov et al. 2019, as
    Diff-Pruning uses it).
    """
    scores = {i: torch.zeros(c) for i, c in enumerate(elastic.full.widths)}
    for sub, full, dims in _Walker(elastic.unet, elastic.full).walk().rows:
        if dims[:1] in (("whole",), ("identity",)) or full not in grads:
            continue
        g = grads[full]
        for d, segs in enumerate(dims):
            if segs is None:
                continue
            red = g.transpose(0, d).reshape(g.shape[d], -1).sum(1) if g.dim() > 1 else g
            offset = 0
            for space, size in segs:
                if space[0] == "s":
                    scores[space[1]] += red[offset:offset + size]
                offset += size
    return scores

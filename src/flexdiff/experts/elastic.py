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
from typing import Iterator

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from torch.func import functional_call

from ..errors import FlexdiffError
from ..mixture import SubnetSpec, full_spec
from .walker import IdentityRow, ParamRow, Walker, WholeRow, attention_is_plain, segment_index, subnet_config


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
        walker = Walker(unet, self.full).walk()
        self._whole_stages = {row.stage for row in walker.rows if isinstance(row, WholeRow)}
        self._links = walker.links
        self._cells = self._norm_cells(walker)

    def _norm_cells(self, walker: "Walker") -> dict[int, list[int]]:
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
        has_attn = any(attention_is_plain(a) for a in self._stage_attentions(stage))
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
            for row in Walker(self.unet, spec).walk().rows:
                if isinstance(row, IdentityRow):
                    if f"{row.sub}.weight" in sub_params:
                        rows.append((row.sub, None, (keep[row.inp], keep[row.out])))
                    continue
                if isinstance(row, WholeRow):
                    prefix_s, prefix_f = row.sub + ".", row.full + "."
                    for name in sub_params:
                        if name.startswith(prefix_s):
                            rows.append((name, prefix_f + name[len(prefix_s):], None))
                    continue
                if row.sub not in sub_params:
                    # a learned shortcut between stages cut to equal widths: diffusers builds an identity there
                    continue
                idx = []
                for d, segs in enumerate(row.dims):
                    if segs is None:
                        idx.append(None)
                        continue
                    # attention inner dims are not in `keep`: a prefix, as long as the template's
                    cat = segment_index(segs, lambda space, size: keep.get(space, torch.arange(sub_params[row.sub].shape[d])))
                    whole = sum(size for _, size in segs)
                    idx.append(None if len(cat) == whole and torch.equal(cat, torch.arange(whole)) else cat)
                rows.append((row.sub, row.full, idx))
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
        for row in Walker(self.unet, self.full).walk().rows:
            if not isinstance(row, ParamRow):
                continue
            t = params[row.full]
            for d, segs in enumerate(row.dims):
                if segs is not None:
                    t = t.index_select(d, segment_index(segs, lambda space, size: perms.get(space, torch.arange(size))))
            new[row.full] = t.clone()
        for name, t in new.items():
            params[name].copy_(t)
        self._plans.clear()


    # ---- the interface the experts pipeline shares with the elastic transformer
    def static_specs(self) -> list[SubnetSpec]:
        """The single pruned model's candidates (Diff-Pruning): one width fraction everywhere, full depth."""
        return uniform_width(self)

    def probe_specs(self) -> list[SubnetSpec]:
        """Sub-networks whose loss scores something beyond the channels' Taylor importance: none for a UNet."""
        return []

    def apply_importance(self, grads: dict[str, torch.Tensor], probe_losses: list[float] | None = None) -> None:
        """Re-order the channels by first-order Taylor importance (`grads`: accumulated |w * dL/dw|)."""
        self.reorder(stage_scores(self, grads))

    def extra_state(self) -> dict:
        return {}  # the re-ordered weights hold everything

    def load_extra_state(self, state: dict) -> None:
        pass


def uniform_width(elastic) -> list[SubnetSpec]:
    """The sub-networks with one width fraction for every cut stage, at full depth."""
    out = []
    for spec in elastic.all_specs():
        cut = [i for i in range(len(spec.widths)) if len(elastic.width_choices(i)) > 1]
        if len({round(spec.widths[i] / elastic.full.widths[i], 6) for i in cut}) <= 1 and spec.depths == elastic.full.depths:
            out.append(spec)
    return out


def make_elastic(model):
    """The elastic form of a denoiser: a UNet's channels and ResNets, or a FLUX transformer's heads and blocks."""
    if type(model).__name__ == "FluxTransformer2DModel":
        from .elastic_transformer import ElasticTransformer

        return ElasticTransformer(model)
    return ElasticUNet(model)


def stage_scores(elastic: ElasticUNet, grads: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """First-order Taylor importance per channel of each stage: sum of |w * dL/dw| over its parameters.

    `grads` maps full parameter names to accumulated |w * grad| tensors (Molchanov et al. 2019, as
    Diff-Pruning uses it).
    """
    scores = {i: torch.zeros(c) for i, c in enumerate(elastic.full.widths)}
    for row in Walker(elastic.unet, elastic.full).walk().rows:
        if not isinstance(row, ParamRow) or row.full not in grads:
            continue
        g = grads[row.full]
        for d, segs in enumerate(row.dims):
            if segs is None:
                continue
            red = g.transpose(0, d).reshape(g.shape[d], -1).sum(1) if g.dim() > 1 else g
            offset = 0
            for space, size in segs:
                if space[0] == "s":
                    scores[space[1]] += red[offset:offset + size]
                offset += size
    return scores

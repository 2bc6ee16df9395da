"""Elastic transformers: one full set of weights, run or cut out with fewer blocks and a narrower width.

The same construction as the elastic UNet (experts/elastic.py): a sub-network is a *static* diffusers model of the
same class, built from a rewritten config, whose parameters are slices of the full ones; running the elastic model
at a setting is `torch.func.functional_call` of that template with the sliced tensors (gradients reach the full
weights), and extracting it copies the same slices into the template, so the extracted model is the same function
by construction. No diffusers code is forked, and an extracted expert is a stock model that
`FluxTransformer2DModel.from_pretrained` loads alone.

**Depth** (the natural axis of a transformer: TinyFusion, Fang et al. 2025, halves DiT-XL/2's depth): which blocks
run. A sub-network's `depths` is one keep flag per block, in call order (the dual-stream blocks, then the
single-stream ones); the options drop blocks in a scored order (`drop_order`: the least important first), not only
from the end.

**Width**: whole attention heads. In FLUX the attention's inner size *is* the residual width
(`num_attention_heads * attention_head_dim`) and every MLP is four times that (fixed in diffusers' blocks), so a
sub-network with k of the H heads is narrower everywhere: k heads, k * head_dim residual channels, the time
embedding at the same width, and 4 * k * head_dim hidden units in each MLP. Each of those spaces keeps its most
important members: `apply_importance` permutes each space (consistently everywhere, so the function is unchanged) by
first-order Taylor importance, most important first, and slicing keeps a prefix; a head keeps all its channels in
order (its rotary embedding needs them). Widths are therefore whole heads, and every MLP size a
multiple of 4 * head_dim: shapes the kernels run well.

Supported: FluxTransformer2DModel (the default transformer's shape). Other transformer classes are refused with
the reason.
"""

from __future__ import annotations

import copy
import re
from collections import OrderedDict
from typing import Iterator

import torch
from torch.func import functional_call

from ..errors import FlexdiffError
from ..mixture import SubnetSpec

STACK_ATTRS = ("transformer_blocks", "single_transformer_blocks")

# How each parameter's dimensions index the model's spaces: R residual, T time embedding, H attention heads'
# channels, M the block's own MLP hidden units (one space per MLP), "6R" six residual-sized chunks (adaLN's
# shift/scale/gate outputs), "H+M" the attention output and the MLP hidden concatenated; None = kept whole.
# A bias follows its weight's first dimension. Names are matched after the block prefix (blocks) or whole (the rest).
_TOP = {
    r"time_text_embed\.(timestep|guidance)_embedder\.linear_1": ("T", None),
    r"time_text_embed\.(timestep|guidance)_embedder\.linear_2": ("T", "T"),
    r"time_text_embed\.text_embedder\.linear_1": ("T", None),
    r"time_text_embed\.text_embedder\.linear_2": ("T", "T"),
    r"context_embedder": ("R", None),
    r"x_embedder": ("R", None),
    r"norm_out\.linear": ("2R", "T"),
    r"proj_out": (None, "R"),
}
_DUAL = {
    r"norm1(_context)?\.linear": ("6R", "T"),
    r"attn\.norm_(added_)?[qk]": (None,),
    r"attn\.(to_[qkv]|add_[qkv]_proj)": ("H", "R"),
    r"attn\.(to_out\.0|to_add_out)": ("R", "H"),
    r"(ff|ff_context)\.net\.0\.proj": ("M", "R"),
    r"(ff|ff_context)\.net\.2": ("R", "M"),
}
_SINGLE = {
    r"norm\.linear": ("3R", "T"),
    r"attn\.norm_[qk]": (None,),
    r"attn\.to_[qkv]": ("H", "R"),
    r"proj_mlp": ("M", "R"),
    r"proj_out": ("R", "H+M"),
}
_RULES = {"transformer_blocks": _DUAL, "single_transformer_blocks": _SINGLE, None: _TOP}
_MLP_OWNER = re.compile(r"^(ff|ff_context)\.")


def _split(name: str) -> tuple[str | None, int | None, str]:
    """'single_transformer_blocks.3.attn.to_q.weight' -> ('single_transformer_blocks', 3, 'attn.to_q.weight')."""
    for attr in STACK_ATTRS:
        m = re.match(rf"^{attr}\.(\d+)\.(.+)$", name)
        if m:
            return attr, int(m.group(1)), m.group(2)
    return None, None, name


def _dims(name: str) -> tuple:
    attr, _, rest = _split(name)
    stem, _, leaf = rest.rpartition(".")
    for pattern, dims in _RULES[attr].items():
        if re.fullmatch(pattern, stem):
            return dims[:1] if leaf == "bias" else dims
    raise FlexdiffError(f"elastic transformer: no slicing rule for the parameter {name}")


def _mlp_space(name: str) -> str:
    """The MLP hidden space a block parameter's 'M' dimension belongs to (one per MLP)."""
    attr, k, rest = _split(name)
    owner = _MLP_OWNER.match(rest)
    return f"M:{attr}.{k}" + (f".{owner.group(1)}" if owner else "")


class ElasticTransformer(torch.nn.Module):
    """A diffusers FLUX transformer made elastic in depth (which blocks) and width (whole heads);
    `forward(..., spec=...)` runs a sub-network, `extract(spec)` cuts it out."""

    def __init__(self, model):
        super().__init__()
        if type(model).__name__ != "FluxTransformer2DModel":
            raise FlexdiffError(f"{type(model).__name__}: elastic transformer experts support FluxTransformer2DModel "
                                "(the default transformer's shape) for now")
        self.unet = model  # the name the experts pipeline uses for the elastic model's full network
        cfg = model.config
        self.head_dim, self.heads = int(cfg.attention_head_dim), int(cfg.num_attention_heads)
        self.width = self.head_dim * self.heads
        self.counts = (int(cfg.num_layers), int(cfg.num_single_layers))
        self.num_blocks = sum(self.counts)
        self.full = SubnetSpec((self.width,), (1,) * self.num_blocks)
        self.drop_order: tuple[int, ...] = self._default_drop_order()
        self._templates: OrderedDict[SubnetSpec, torch.nn.Module] = OrderedDict()
        self._plans: dict[SubnetSpec, list] = {}

    def _default_drop_order(self) -> tuple[int, ...]:
        """Before any scoring: the middle blocks first, the first and the last ones last (they carry the most)."""
        mid = (self.num_blocks - 1) / 2
        return tuple(sorted(range(self.num_blocks), key=lambda k: (abs(k - mid), k)))

    # ---- the space of sub-networks
    def width_choices(self, stage: int = 0) -> list[int]:
        """Widths: whole heads, from one head up."""
        return [self.head_dim * k for k in range(1, self.heads + 1)]

    def depth_options(self) -> list[tuple[int, ...]]:
        """Keep flags per block: the full stack, then one more block dropped at a time in `drop_order`, down to one
        block of each stack that has any (FLUX's stacks may not be emptied)."""
        keep = [1] * self.num_blocks
        out = [tuple(keep)]
        for k in self.drop_order:
            keep[k] = 0
            dual, single = sum(keep[:self.counts[0]]), sum(keep[self.counts[0]:])
            if (self.counts[0] and not dual) or (self.counts[1] and not single):
                keep[k] = 1  # this block is its stack's last: keep it, drop the next one
                continue
            out.append(tuple(keep))
        return out

    def validate(self, spec: SubnetSpec, where: str = "spec") -> None:
        if len(spec.widths) != 1 or spec.widths[0] not in self.width_choices():
            raise FlexdiffError(f"{where}: widths {list(spec.widths)}; a transformer has one width, whole heads of "
                                f"{self.head_dim}: accepted {self.width_choices()}")
        if spec.depths not in self.depth_options():
            raise FlexdiffError(f"{where}: depths {list(spec.depths)} (one keep flag per block, {self.num_blocks} "
                                f"blocks); accepted: {[list(d) for d in self.depth_options()]}")

    def smallest(self) -> SubnetSpec:
        return SubnetSpec((self.width_choices()[0],), self.depth_options()[-1])

    def random_spec(self, gen: torch.Generator) -> SubnetSpec:
        def pick(xs):
            return xs[int(torch.randint(len(xs), (1,), generator=gen))]
        return SubnetSpec((pick(self.width_choices()),), pick(self.depth_options()))

    def all_specs(self) -> Iterator[SubnetSpec]:
        for w in self.width_choices():
            for d in self.depth_options():
                yield SubnetSpec((w,), d)

    def static_specs(self) -> list[SubnetSpec]:
        """The single pruned model's candidates (TinyFusion-style): full width, blocks dropped in the scored order."""
        return [SubnetSpec(self.full.widths, d) for d in self.depth_options()]

    # ---- slicing
    def _kept_blocks(self, spec: SubnetSpec) -> dict[str, list[int]]:
        n_dual = self.counts[0]
        return {"transformer_blocks": [k for k in range(n_dual) if spec.depths[k]],
                "single_transformer_blocks": [k - n_dual for k in range(n_dual, self.num_blocks) if spec.depths[k]]}

    def _index(self, token, name: str, size: int, pick) -> torch.Tensor | None:
        """The indices along one dimension of parameter `name` (full size `size`), given `pick(space, n)`: the
        members of a space to take, in order (a prefix when slicing, a permutation when re-ordering); None: all."""
        if token is None:
            return None
        if token in ("R", "T"):
            return pick(token, self.width)
        if token == "H":  # whole heads, each with its channels in order
            heads = pick("H", self.heads)
            return (heads[:, None] * self.head_dim + torch.arange(self.head_dim)[None, :]).reshape(-1)
        if token == "M":
            return pick(_mlp_space(name), size)
        if token == "H+M":
            return torch.cat([self._index("H", name, self.width, pick),
                              self.width + self._index("M", name, size - self.width, pick)])
        r = pick("R", self.width)  # "6R": adaLN's chunks, each a residual-sized slice
        return torch.cat([c * self.width + r for c in range(int(token[:-1]))])

    @staticmethod
    def _prefix(width: int, full_width: int):
        """Slicing at `width`: the first members of every space, in the same proportion (heads: width / head_dim)."""
        def pick(space: str, n: int) -> torch.Tensor:
            return torch.arange(n * width // full_width)
        return pick

    def sub_state(self, spec: SubnetSpec, check: bool = True) -> dict[str, torch.Tensor]:
        """The sub-network's parameters, as differentiable slices of the full ones (template names)."""
        if check:
            self.validate(spec)
        full = dict(self.unet.named_parameters())
        out = {}
        for name, source, cuts in self._plan(spec):
            t = full[source]
            for d, ix in cuts:
                t = t.index_select(d, ix.to(t.device))
            out[name] = t
        return out

    def _plan(self, spec: SubnetSpec) -> list[tuple[str, str, list[tuple[int, torch.Tensor]]]]:
        """Per template parameter: the full parameter it is cut from and the (dimension, indices) cuts; computed
        once per sub-network (the indices depend on its shape only, and the elastic fine-tuning calls it every
        step)."""
        if spec not in self._plans:
            full = dict(self.unet.named_parameters())
            kept = self._kept_blocks(spec)
            pick = self._prefix(spec.widths[0], self.width)
            plan = []
            for name, _ in self.template(spec).named_parameters():
                attr, k, rest = _split(name)
                source = name if attr is None else f"{attr}.{kept[attr][k]}.{rest}"
                cuts = []
                for d, token in enumerate(_dims(source)):
                    size = full[source].shape[d]
                    ix = self._index(token, source, size, pick)
                    if ix is not None and not torch.equal(ix, torch.arange(size)):
                        cuts.append((d, ix))
                plan.append((name, source, cuts))
            self._plans[spec] = plan
        return self._plans[spec]

    def template(self, spec: SubnetSpec):
        if spec not in self._templates:
            kept = self._kept_blocks(spec)
            cfg = {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}
            cfg.update(num_attention_heads=spec.widths[0] // self.head_dim,
                       num_layers=len(kept["transformer_blocks"]),
                       num_single_layers=len(kept["single_transformer_blocks"]))
            with torch.random.fork_rng():  # building a module must not move the caller's random stream
                tmpl = type(self.unet).from_config(cfg)
            p = next(self.unet.parameters())
            tmpl.to(p.device, p.dtype).requires_grad_(False).train(self.unet.training)
            for attr in ("flexdiff_label_tokens", "flexdiff_latent_size"):  # what flexdiff's loader attaches
                if hasattr(self.unet, attr):
                    setattr(tmpl, attr, getattr(self.unet, attr))
            self._templates[spec] = tmpl
            if len(self._templates) > 64:
                self._templates.popitem(last=False)
        else:
            self._templates.move_to_end(spec)
        return self._templates[spec]

    def forward(self, *args, spec: SubnetSpec | None = None, **kwargs):
        if spec is None or spec == self.full:  # every member kept, in order: the model itself
            return self.unet(*args, **kwargs)
        return self._run(spec, args, kwargs)

    def _run(self, spec: SubnetSpec, args, kwargs, check: bool = True):
        tmpl = self.template(spec)
        tmpl.train(self.unet.training)
        return functional_call(tmpl, self.sub_state(spec, check), args, kwargs)

    @torch.no_grad()
    def extract(self, spec: SubnetSpec):
        """The static sub-network: a stock diffusers transformer with a rewritten config and copied weights."""
        model = copy.deepcopy(self.template(spec))
        model.load_state_dict({k: v.detach().clone() for k, v in self.sub_state(spec).items()}, strict=True)
        return model.eval()

    # ---- importance
    def probe_specs(self) -> list[SubnetSpec]:
        """One sub-network per block, that block alone dropped: how much the loss rises without it scores the
        block (the depth options' drop order, `apply_importance`)."""
        return [SubnetSpec(self.full.widths, tuple(int(j != k) for j in range(self.num_blocks)))
                for k in range(self.num_blocks)]

    def probe(self, spec: SubnetSpec, args, kwargs):
        """Run a probe sub-network (outside the depth options, so unchecked)."""
        return self._run(spec, args, kwargs, check=False)

    def importance_scores(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """First-order Taylor importance of every member of every space, from accumulated |w * dL/dw| per full
        parameter (Molchanov et al. 2019, as for the UNet's channels)."""
        scores: dict[str, torch.Tensor] = {}

        def add(space: str, values: torch.Tensor) -> None:
            scores[space] = scores.get(space, torch.zeros_like(values)) + values

        for name, g in grads.items():
            g = g.detach().abs().float().cpu()
            for d, token in enumerate(_dims(name)):
                if token is None:
                    continue
                red = g.transpose(0, d).reshape(g.shape[d], -1).sum(1) if g.dim() > 1 else g
                if token in ("R", "T"):
                    add(token, red)
                elif token == "H":
                    add("H", red.view(self.heads, self.head_dim).sum(1))
                elif token == "M":
                    add(_mlp_space(name), red)
                elif token == "H+M":
                    add("H", red[:self.width].view(self.heads, self.head_dim).sum(1))
                    add(_mlp_space(name), red[self.width:])
                else:
                    add("R", red.view(int(token[:-1]), self.width).sum(0))
        return scores

    def apply_importance(self, grads: dict[str, torch.Tensor], probe_losses: list[float] | None = None) -> None:
        """Re-order every space by importance, most important first (the function is unchanged: residual
        channels, time-embedding channels, heads and MLP units are only permuted, consistently everywhere), so
        that slicing keeps the most important members; and with `probe_losses` (the loss of each of
        `probe_specs`), order the blocks for dropping: the one whose absence costs least first."""
        scores = self.importance_scores(grads)
        perms = {space: torch.argsort(-sc, stable=True) for space, sc in scores.items()}

        def pick(space: str, n: int) -> torch.Tensor:
            return perms.get(space, torch.arange(n))

        with torch.no_grad():
            for name, p in self.unet.named_parameters():
                t = p.detach()
                for d, token in enumerate(_dims(name)):
                    ix = self._index(token, name, t.shape[d], pick)
                    if ix is not None:
                        t = t.index_select(d, ix.to(t.device))
                p.copy_(t.clone())
        if probe_losses is not None:
            if len(probe_losses) != self.num_blocks:
                raise FlexdiffError(f"block scores: {len(probe_losses)} given, the model has {self.num_blocks} blocks")
            self.drop_order = tuple(sorted(range(self.num_blocks), key=lambda k: (probe_losses[k], k)))
        self._templates.clear()
        self._plans.clear()

    def extra_state(self) -> dict:
        """What the weights do not hold and a rebuilt elastic model needs: the blocks' drop order."""
        return {"drop_order": list(self.drop_order)}

    def load_extra_state(self, state: dict) -> None:
        order = tuple(int(k) for k in state.get("drop_order", ()))
        if sorted(order) != list(range(self.num_blocks)):
            raise FlexdiffError(f"elastic transformer state: drop order {list(order)} is not a permutation of the "
                                f"{self.num_blocks} blocks")
        self.drop_order = order

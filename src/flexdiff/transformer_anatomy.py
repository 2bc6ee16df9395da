"""Transformer anatomy: where a diffusers transformer denoiser (DiT, PixArt, SD3, FLUX) can be cut.

A transformer denoiser is embeddings, a stack of blocks (`transformer_blocks`; FLUX adds
`single_transformer_blocks` after them), then a norm and a projection out.
Each block maps the streams it carries (the image tokens, and the text tokens of SD3 / FLUX dual-stream
blocks) to new values of the same shapes. Number the states between blocks: S_0 enters block 0, S_k leaves
block k - 1, S_N leaves the last block.

A **partial step at branch (F, B)** runs the first F blocks and the last B, and in place of the middle
N - F - B it adds the middle's residual from the last full step: S_{N-B} := S_F + (S*_{N-B} - S*_F), where
S* are the states the last full step recorded (the Δ-DiT / FORA / DBCache mechanism, Chen et al. 2024,
Selvaraju et al. 2024; here decided ahead of time by the schedule, not by a threshold at run time). The
middle blocks are not called (their hooks return their input). A full step runs every block and records the
states the schedule's branches need; a null step makes no call at all (engine.py).

The branches of a model with N blocks are the pairs (F, B) with F, B in {1, 2, 4, ...} (up to N / 2) and
F + B < N, ordered by cost (F + B, then F): branch 0 is the cheapest.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import ModelHook

from .errors import FlexdiffError
from .schedule import StepKind

# diffusers transformer classes flexdiff cuts, and the attributes holding their block stacks (in call order)
STACKS = {
    "DiTTransformer2DModel": ("transformer_blocks",),
    "PixArtTransformer2DModel": ("transformer_blocks",),
    "SD3Transformer2DModel": ("transformer_blocks",),
    "FluxTransformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
}
# the scheduler timestep is divided by this before the pipeline calls the transformer (FLUX)
TIMESTEP_SCALE = {"FluxTransformer2DModel": 1000.0}


def supported_names() -> str:
    return ", ".join(STACKS)


def is_transformer(model: torch.nn.Module) -> bool:
    return type(model).__name__ in STACKS


def transformer_branches(depth: int) -> tuple[tuple[int, int], ...]:
    """(F, B) pairs of a stack of `depth` blocks: F, B powers of two up to depth / 2, F + B < depth, cheapest first."""
    sizes = [1 << i for i in range(depth.bit_length()) if (1 << i) <= max(1, depth // 2)]
    pairs = [(f, b) for f in sizes for b in sizes if f + b < depth]
    return tuple(sorted(pairs, key=lambda p: (p[0] + p[1], p[0])))


def _block_metadata(block: torch.nn.Module):
    from diffusers.hooks._helpers import TransformerBlockRegistry

    try:
        return TransformerBlockRegistry.get(type(block))
    except ValueError:
        raise FlexdiffError(f"{type(block).__name__}: a transformer block diffusers does not describe (which "
                            "streams it takes and returns); flexdiff cannot cut around it") from None


@dataclass
class TransformerAnatomy:
    """Where partial steps may cut a transformer: its blocks in call order and the (F, B) of every branch."""

    model: torch.nn.Module
    blocks: list[torch.nn.Module]
    branches: tuple[tuple[int, int], ...]
    timestep_scale: float = 1.0
    _timestep_index: int = field(default=0, repr=False)

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def cache_keys(self) -> int:
        return self.depth + 1  # S_0 .. S_N

    def branch_name(self, b: int) -> str:
        f, k = self.branches[b]
        return f"first {f} + last {k} of {self.depth} blocks"

    def boundaries(self, branch: int) -> tuple[int, int]:
        f, b = self.branches[branch]
        return f, self.depth - b

    def feature_site(self):
        """The middle block and how to read its image tokens from its output: the features the timestep-similarity
        measure compares."""
        block = self.blocks[self.depth // 2]
        meta = _block_metadata(block)
        if not isinstance(getattr(meta, "return_hidden_states_index", None), int):
            return block, lambda out: out[0] if isinstance(out, tuple) else out
        return block, lambda out: out[meta.return_hidden_states_index] if isinstance(out, tuple) else out

    def timestep(self, args, kwargs):
        """The scheduler timestep a call is made at (FLUX's pipeline passes it divided by 1,000)."""
        t = kwargs["timestep"] if "timestep" in kwargs else args[self._timestep_index]
        return t * self.timestep_scale if self.timestep_scale != 1.0 else t

    @property
    def packs_latents(self) -> bool:
        return type(self.model).__name__ == "FluxTransformer2DModel"

    def call_inputs(self, x: torch.Tensor, t: torch.Tensor, conditioning: dict | None = None) -> dict:
        """The image and timestep inputs of one call on latents x (N, C, H, W) at scheduler timestep t, as the
        model's pipeline makes them: FLUX packs 2 x 2 patches into tokens, gives their grid positions, the text
        tokens' positions (zeros, one per token of `conditioning`'s text states, unless it has its own) and t / 1000."""
        if not self.packs_latents:
            return {"hidden_states": x, "timestep": t}
        n, c, h, w = x.shape
        packed = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)
        ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=x.dtype)
        ids[..., 1] += torch.arange(h // 2, device=x.device)[:, None]
        ids[..., 2] += torch.arange(w // 2, device=x.device)[None, :]
        out = {"hidden_states": packed, "timestep": t / self.timestep_scale, "img_ids": ids.reshape(-1, 3)}
        text = (conditioning or {}).get("encoder_hidden_states")
        if text is not None and "txt_ids" not in conditioning:
            out["txt_ids"] = torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype)
        return out

    def call_output(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The model's prediction in the latents' layout (FLUX: its tokens unpacked to (N, C, H, W))."""
        if not self.packs_latents:
            return out
        n, c, h, w = x.shape
        return out.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)

    def image_tokens(self, shape: tuple[int, ...]) -> int:
        """Image tokens of latents of `shape` (C, H, W): what FLUX's resolution-dependent shift is computed from."""
        p = 2 if self.packs_latents else int(getattr(self.model.config, "patch_size", 1) or 1)
        return (shape[-2] // p) * (shape[-1] // p)

    def latent_channels(self) -> int:
        """Channels of the latents the model denoises (FLUX's in_channels count 2 x 2 packed patches)."""
        c = int(self.model.config.in_channels)
        return c // 4 if self.packs_latents else c

    def example_inputs(self, context_len: int = 77) -> dict:
        """Keyword inputs of one call on one image (CPU, float32), at the model's sequence length: what MACs are
        counted on. Text tokens: `context_len` (1 for a model given its labels as tokens). FLUX has no sample size
        in its config: 1,024-pixel images (128 x 128 latents, 4,096 image tokens) unless the model carries
        `flexdiff_latent_size`."""
        cfg, name, z = self.model.config, type(self.model).__name__, torch.zeros
        t = torch.tensor([500.0 / self.timestep_scale])
        tokens = getattr(self.model, "flexdiff_label_tokens", None)
        L = 1 if tokens is not None else context_len
        if name == "FluxTransformer2DModel":
            side = int(getattr(self.model, "flexdiff_latent_size", 128))  # FLUX: no sample size in its config
            n = (side // 2) ** 2  # 2 x 2 patches packed into tokens by the pipeline
            kw = {"hidden_states": z(1, n, cfg.in_channels), "encoder_hidden_states": z(1, L, cfg.joint_attention_dim),
                  "pooled_projections": z(1, cfg.pooled_projection_dim), "timestep": t,
                  "img_ids": z(n, 3), "txt_ids": z(L, 3)}
            if cfg.guidance_embeds:
                kw["guidance"] = torch.tensor([3.5])
            return kw
        kw = {"hidden_states": z(1, cfg.in_channels, cfg.sample_size, cfg.sample_size), "timestep": t}
        if name == "DiTTransformer2DModel":
            kw["class_labels"] = z(1, dtype=torch.long)
        elif name == "PixArtTransformer2DModel":
            kw["encoder_hidden_states"] = z(1, L, cfg.caption_channels)
            extra = self.model.use_additional_conditions  # PixArt-alpha at 1,024: resolution and aspect ratio
            kw["added_cond_kwargs"] = ({"resolution": z(1, 2), "aspect_ratio": z(1, 1)} if extra
                                       else {"resolution": None, "aspect_ratio": None})
        elif name == "SD3Transformer2DModel":
            kw["encoder_hidden_states"] = z(1, L, cfg.joint_attention_dim)
            kw["pooled_projections"] = z(1, cfg.pooled_projection_dim)
        return kw

    def hooks(self, engine, first_key: int) -> list[tuple[torch.nn.Module, ModelHook]]:
        return [(block, _BlockHook(engine, self, k, first_key, _block_metadata(block)))
                for k, block in enumerate(self.blocks)]


def transformer_anatomy(model: torch.nn.Module) -> TransformerAnatomy:
    name = type(model).__name__
    if name not in STACKS:
        raise FlexdiffError(f"{name} cannot be cut by flexdiff; supported denoisers: UNet2DModel, "
                            f"UNet2DConditionModel, {supported_names()}")
    blocks = [b for attr in STACKS[name] for b in (getattr(model, attr, None) or [])]
    for b in blocks:
        _block_metadata(b)
    params = list(inspect.signature(type(model).forward).parameters)[1:]
    return TransformerAnatomy(model=model, blocks=blocks, branches=transformer_branches(len(blocks)),
                              timestep_scale=TIMESTEP_SCALE.get(name, 1.0),
                              _timestep_index=params.index("timestep") if "timestep" in params else 1)


class _BlockHook(ModelHook):
    """On block k: run it, skip it (the middle of a partial step), or add the cached middle residual (block F)."""

    def __init__(self, engine, anat: TransformerAnatomy, k: int, first_key: int, meta: Any):
        super().__init__()
        self.engine, self.anat, self.k, self.key0, self.meta = engine, anat, k, first_key, meta
        self.two_streams = meta.return_encoder_hidden_states_index is not None

    def _inputs(self, args, kwargs) -> tuple:
        h = self.meta._get_parameter_from_args_kwargs(self.meta.hidden_states_argument_name, args, kwargs)
        if not self.two_streams:
            return (h,)
        e = self.meta._get_parameter_from_args_kwargs(self.meta.encoder_hidden_states_argument_name, args, kwargs)
        return (h, e)

    def _outputs(self, out) -> tuple:
        if not self.two_streams:
            return (out[0] if isinstance(out, tuple) else out,)
        return (out[self.meta.return_hidden_states_index], out[self.meta.return_encoder_hidden_states_index])

    def _pack(self, states: tuple):
        if not self.two_streams:
            return states[0]
        out = [None, None]
        out[self.meta.return_hidden_states_index] = states[0]
        out[self.meta.return_encoder_hidden_states_index] = states[1]
        return tuple(out)

    def new_forward(self, module, *args, **kwargs):
        run, k = self.engine.run, self.k
        if run.mode is StepKind.PARTIAL:
            start, end = self.anat.boundaries(run.branch)
            if start <= k < end:  # the middle: not run
                states = self._inputs(args, kwargs)
                if k == start:  # S_end := S_start + (S*_end - S*_start), stream by stream
                    cache = run.cache[run.slot]
                    then_in, then_out = cache[self.key0 + start], cache[self.key0 + end]
                    states = tuple(s if s is None or a is None else s + (b - a)
                                   for s, a, b in zip(states, then_in, then_out))
                return self._pack(states)
        if run.mode is StepKind.FULL and k == 0 and 0 in self.engine.needed:
            run.cache[run.slot][self.key0] = self._inputs(args, kwargs)
        out = self.fn_ref.original_forward(*args, **kwargs)
        if run.mode is StepKind.FULL and k + 1 in self.engine.needed:
            run.cache[run.slot][self.key0 + k + 1] = self._outputs(out)
        return out

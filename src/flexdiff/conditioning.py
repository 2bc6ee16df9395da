"""What a conditional UNet is conditioned on: text embeddings (with SDXL's added conditions) or class
labels, and how classifier-free guidance pairs them with the unconditional branch."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .errors import FlexdiffError

LABEL_TOKENS_FILE = "label_tokens.json"  # in a model folder: its labels are given as one-hot tokens


@dataclass(frozen=True)
class LabelTokens:
    """Class labels given to a text-conditioned transformer (SD3-shaped) in place of a prompt.

    Label k is one token, the one-hot vector e_k of length `classes` (the last index is the null label),
    given both as the text tokens and as the pooled projection: the model's own context embedder and
    pooled-projection layer are then its learned label embedding, and the denoiser stays a stock diffusers
    class that loads alone. A model folder says so in `label_tokens.json` ({"classes": N}, and for a transformer
    whose config has no sample size, FLUX-shaped, "sample_size": the latents' side).
    """

    classes: int

    def __post_init__(self):
        if isinstance(self.classes, bool) or not isinstance(self.classes, int) or self.classes < 2:
            raise FlexdiffError(f"{LABEL_TOKENS_FILE}: classes is {self.classes!r}; expected a whole number >= 2 "
                                "(the labels and the null label)")

    @property
    def null_label(self) -> int:
        return self.classes - 1

    def kwargs(self, labels: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict:
        """The model's text inputs for `labels` (N,): one token per row and its pooled projection."""
        e = F.one_hot(labels.long(), self.classes).to(dtype)
        return {"encoder_hidden_states": e[:, None, :], "pooled_projections": e}


def label_inputs(labels: torch.Tensor, tokens: LabelTokens | None = None) -> dict:
    """A class-conditional denoiser's inputs for `labels` (N,): one-hot label tokens for a transformer given them,
    else `class_labels`."""
    return tokens.kwargs(labels) if tokens is not None else {"class_labels": labels}


def read_label_tokens(model, folder) -> None:
    """Attach what a folder's `label_tokens.json` says to a loaded transformer (its labels as one-hot tokens, and
    for a FLUX-shaped one the latents' side, which FLUX's config lacks); nothing when the folder has none."""
    from pathlib import Path

    from .io import read_json_object

    tokens_file = Path(folder) / LABEL_TOKENS_FILE
    if not tokens_file.exists():
        return
    spec = read_json_object(tokens_file, "the label tokens")
    model.flexdiff_label_tokens = LabelTokens(spec.get("classes"))
    size = spec.get("sample_size")
    if size is not None:  # a transformer whose config has no sample size (FLUX-shaped)
        if isinstance(size, bool) or not isinstance(size, int) or size < 2 or size % 2:
            raise FlexdiffError(f"{tokens_file}: sample_size is {size!r}; expected an even whole number >= 2")
        model.flexdiff_latent_size = size
    if model.flexdiff_label_tokens.classes != getattr(model.config, "joint_attention_dim", None):
        raise FlexdiffError(f"{tokens_file}: classes is {model.flexdiff_label_tokens.classes}; the model's "
                            f"joint_attention_dim is {getattr(model.config, 'joint_attention_dim', None)} "
                            "(one-hot tokens need the two equal)")


def label_tokens_record(model, tokens: LabelTokens | None = None) -> dict | None:
    """What `label_tokens.json` holds for a model (None: it takes no label tokens)."""
    tokens = tokens if tokens is not None else getattr(model, "flexdiff_label_tokens", None)
    if tokens is None:
        return None
    size = getattr(model, "flexdiff_latent_size", None)
    return {"classes": tokens.classes, **({"sample_size": size} if size else {})}


@dataclass(frozen=True)
class ClassSpec:
    """How a class-conditional denoiser takes its labels: `classes` real ones, the unconditional `null` index,
    and for a transformer given labels as tokens, its `tokens`."""

    classes: int
    null: int
    tokens: LabelTokens | None = None

    def kwargs(self, labels: torch.Tensor) -> dict:
        """The model's inputs for `labels` (N,): label tokens for a transformer given them, else `class_labels`."""
        return label_inputs(labels, self.tokens)


def class_spec(model) -> ClassSpec | None:
    """The labels a denoiser takes: a UNet2DModel's `num_class_embeds` (the last is null), DiT's
    `num_embeds_ada_norm` (null = that index), or the label tokens flexdiff loaded with a transformer
    (`model.flexdiff_label_tokens`, from its folder's label_tokens.json). None: not class-conditional."""
    tokens = getattr(model, "flexdiff_label_tokens", None)
    if tokens is not None:
        return ClassSpec(tokens.classes - 1, tokens.null_label, tokens)
    cfg, name = model.config, type(model).__name__
    if name == "DiTTransformer2DModel" and getattr(cfg, "num_embeds_ada_norm", None):
        return ClassSpec(int(cfg.num_embeds_ada_norm), int(cfg.num_embeds_ada_norm))
    n = getattr(cfg, "num_class_embeds", None)
    if n is None or name != "UNet2DModel":
        return None
    return ClassSpec(n - 1, n - 1)


TEXT_DENOISERS = ("UNet2DConditionModel", "PixArtTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel")


def takes_text(model) -> bool:
    """Is the denoiser conditioned on text states (a prompt), as opposed to labels or nothing?"""
    return type(model).__name__ in TEXT_DENOISERS and getattr(model, "flexdiff_label_tokens", None) is None


def embeds_guidance(model) -> bool:
    """Is guidance a model input (FLUX.1-dev's guidance embedding) rather than a second, unconditional branch?"""
    return bool(getattr(model.config, "guidance_embeds", False))


@dataclass
class Conditioning:
    """What a conditional UNet is conditioned on, with classifier-free guidance (Ho & Salimans 2022).

    - text (UNet2DConditionModel): `encoder_hidden_states` (1 or N, seq, dim); the unconditional
      branch is `negative` (zeros if None);
    - class labels (UNet2DModel with `num_class_embeds`): `class_labels` (N,) or (1,); the
      unconditional branch is `null_label`.
    `guidance_scale` 1 means no guidance (one network call per step).
    """

    encoder_hidden_states: torch.Tensor | None = None
    negative: torch.Tensor | None = None
    guidance_scale: float = 1.0
    class_labels: torch.Tensor | None = None
    null_label: int | None = None
    # SDXL's added conditions (pooled text embeddings, size/crop time ids) of each branch
    added: dict[str, torch.Tensor] | None = None
    negative_added: dict[str, torch.Tensor] | None = None
    tokens: LabelTokens | None = None  # class labels given as one-hot tokens (a transformer: LabelTokens)
    # a transformer's other per-row text inputs, as keyword arguments of its call (SD3: pooled_projections;
    # PixArt: encoder_attention_mask), each paired with the unconditional branch's like the text states
    extra: dict[str, torch.Tensor] | None = None
    negative_extra: dict[str, torch.Tensor] | None = None
    fixed: dict | None = None  # keyword arguments passed as they are (PixArt's added_cond_kwargs)

    def __post_init__(self):
        if (self.encoder_hidden_states is None) == (self.class_labels is None):
            raise FlexdiffError("conditioning needs either encoder_hidden_states or class_labels")
        if self.class_labels is not None and self.guidance_scale != 1.0 and self.null_label is None:
            raise FlexdiffError("guidance with class labels needs the model's null label")

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    def model_kwargs(self, n: int) -> dict:
        """Keyword arguments of one UNet call on a batch of n (2n, unconditional first, when guided)."""
        if self.class_labels is not None:
            labels = self.class_labels.long()
            labels = labels.expand(n) if labels.shape[0] == 1 else labels
            if self.guided:
                labels = torch.cat([torch.full_like(labels, self.null_label), labels])
            out = label_inputs(labels, self.tokens)
            return {**out, **(self.fixed or {})}
        def rows(x):
            return x.expand(n, *x.shape[1:]) if x.shape[0] == 1 else x

        def pair(pos, negative):  # unconditional first; a missing negative branch is zeros
            pos = rows(pos)
            return torch.cat([torch.zeros_like(pos) if negative is None else rows(negative).expand_as(pos), pos])

        out = {"encoder_hidden_states": pair(self.encoder_hidden_states, self.negative) if self.guided
               else rows(self.encoder_hidden_states)}
        if self.added is not None:
            neg = self.negative_added or {}
            out["added_cond_kwargs"] = {k: pair(v, neg.get(k)) if self.guided else rows(v) for k, v in self.added.items()}
        if self.extra is not None:
            neg = self.negative_extra or {}
            out.update({k: pair(v, neg.get(k)) if self.guided else rows(v) for k, v in self.extra.items()})
        return {**out, **(self.fixed or {})}

    def rows(self, start: int, stop: int) -> "Conditioning":
        """The conditioning of rows start..stop of a batch (per-row tensors are sliced, shared ones kept)."""
        def cut(x):
            return x if x is None or x.shape[0] == 1 else x[start:stop]
        def cut_all(d):
            return None if d is None else {k: cut(v) for k, v in d.items()}
        return replace(self, encoder_hidden_states=cut(self.encoder_hidden_states), negative=cut(self.negative),
                       class_labels=cut(self.class_labels), added=cut_all(self.added),
                       negative_added=cut_all(self.negative_added), extra=cut_all(self.extra),
                       negative_extra=cut_all(self.negative_extra))

"""What a conditional UNet is conditioned on: text embeddings (with SDXL's added conditions) or class
labels, and how classifier-free guidance pairs them with the unconditional branch."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .errors import FlexdiffError


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
            return {"class_labels": labels}
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
        return out

    def rows(self, start: int, stop: int) -> "Conditioning":
        """The conditioning of rows start..stop of a batch (per-row tensors are sliced, shared ones kept)."""
        def cut(x):
            return x if x is None or x.shape[0] == 1 else x[start:stop]
        def cut_all(d):
            return None if d is None else {k: cut(v) for k, v in d.items()}
        return replace(self, encoder_hidden_states=cut(self.encoder_hidden_states), negative=cut(self.negative),
                       class_labels=cut(self.class_labels), added=cut_all(self.added),
                       negative_added=cut_all(self.negative_added))

"""Fingerprints: what a run runs on (model weights, training data) is part of its identity."""

from __future__ import annotations

import hashlib

import torch


def _raw_bytes(t: torch.Tensor) -> bytes:
    """A tensor's stored bytes (bfloat16, which numpy lacks, read as 16-bit integers: the same bytes)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A short hash of every parameter and buffer."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(_raw_bytes(v))
    return h.hexdigest()[:16]


def data_fingerprint(*tensors: torch.Tensor | None) -> str:
    """A short hash of training data (images, labels)."""
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(_raw_bytes(t))
    return h.hexdigest()[:16]


def text_fingerprint(texts: list[str]) -> str:
    """A short hash of prompts (their order matters: prompt i conditions sample i)."""
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]


def conditioning_tag(labels: tuple[int, ...] = (), guidance: float = 1.0, prompts: tuple[str, ...] = (),
                     negative: str | None = None) -> str:
    """What samples are conditioned on, for cache and folder names ('' = unconditional): labels, prompts
    (hashed) and the guidance scale. Guidance without labels is a text model's (the empty prompt)."""
    tag = f"-labels{'_'.join(map(str, labels))}-g{guidance:g}" if labels else ""
    if prompts or negative is not None or (guidance != 1.0 and not labels):
        tag += f"-prompts{text_fingerprint(list(prompts) + [negative or ''])}-g{guidance:g}"
    return tag

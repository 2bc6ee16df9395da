"""Fingerprints: what a run runs on (model weights, training data) is part of its identity."""

from __future__ import annotations

import hashlib

import torch


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A short hash of every parameter and buffer."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def data_fingerprint(*tensors: torch.Tensor | None) -> str:
    """A short hash of training data (images, labels)."""
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def text_fingerprint(texts: list[str]) -> str:
    """A short hash of prompts (their order matters: prompt i conditions sample i)."""
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]

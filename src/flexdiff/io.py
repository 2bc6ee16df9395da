"""Atomic writes: a crash never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results and shipped files are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json(path: Path, what: str = "") -> Any:
    """Parse a JSON file; a broken one is answered with its path (and what it should hold)."""
    from .errors import FlexdiffError

    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise FlexdiffError(f"{path}: {what + ' is ' if what else ''}not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise FlexdiffError(f"{path}: {what + ' is ' if what else ''}not valid JSON ({e})") from None
    except IsADirectoryError:
        raise FlexdiffError(f"{path}: is a folder; expected a JSON file") from None


def read_json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold an object (a config, a manifest): anything else names the file."""
    from .errors import FlexdiffError

    data = read_json(path, what)
    if not isinstance(data, dict):
        raise FlexdiffError(f"{path}: {what} must be a JSON object {{...}}, found a {type(data).__name__}")
    return data


def load_cache(path: Path) -> dict[str, torch.Tensor] | None:
    """A safetensors cache file, or None when absent or unreadable (a killed run's truncated file is
    removed: a cache is recomputed, never trusted half-written)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        return None
    try:
        return load_file(path)
    except Exception:  # safetensors raises its own error kinds for truncated or foreign files
        path.unlink(missing_ok=True)
        return None


def load_checkpoint(path: Path) -> Any:
    """`torch.load(weights_only=True)` of a resumable run's checkpoint; a broken one names itself."""
    from .errors import FlexdiffError

    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # truncated or foreign files raise many kinds
        raise FlexdiffError(f"{path}: cannot read this checkpoint ({type(e).__name__}); delete it to start "
                            "that part again") from None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors state dict that must be readable (a finished stage's weights): a damaged one names itself."""
    from safetensors.torch import load_file

    from .errors import FlexdiffError, first_line

    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error kinds
        raise FlexdiffError(f"{path}: cannot read these weights ({first_line(e)}); "
                            "delete it to rebuild that part") from None


def load_strict(cls, folder: Path, where: str):
    """`cls.from_pretrained(folder)` from safetensors, refusing weights that do not match the config: a key the
    config has no place for (say a class embedding under `num_class_embeds: null`) or a layer it lacks weights
    for would otherwise be dropped or left random, with no more than a warning."""
    from .errors import FlexdiffError, first_line

    try:
        model, info = cls.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False, output_loading_info=True)
    except Exception as e:  # diffusers raises many kinds for corrupt files
        raise FlexdiffError(f"{where}: cannot load the weights ({first_line(e)})") from None
    for what, why in (("unexpected_keys", "the weights hold tensors its config.json has no place for"),
                      ("missing_keys", "its config.json asks for layers the weights do not hold"),
                      ("mismatched_keys", "tensors whose shapes differ from what config.json builds")):
        keys = [k if isinstance(k, str) else k[0] for k in info.get(what) or []]
        if keys:
            shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
            raise FlexdiffError(f"{where}: config.json and the weights disagree: {why} ({shown})")
    return model


def write_text(path: Path, text: str) -> Path:
    return _atomic(path, lambda p: p.write_text(text))


def write_json(path: Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def torch_save(path: Path, obj: Any) -> Path:
    return _atomic(path, lambda p: torch.save(obj, p))


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    return _atomic(path, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p)))


def save_figure(path: Path, fig) -> Path:
    """Save a matplotlib figure atomically (format from the path's suffix)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return _atomic(path, lambda p: fig.savefig(p, format=fmt, dpi=120, bbox_inches="tight"))


def save_npz(path: Path, **arrays) -> Path:
    import numpy as np

    return _atomic(path, lambda p: p.write_bytes(_npz_bytes(np, arrays)))


def _npz_bytes(np, arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()

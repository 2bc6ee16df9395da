"""Where a model runs: the device and dtype asked for on the command line, or read off a loaded model.

The library follows the model: sampling, cost counting and timing run on the device and in the dtype
of the model's weights. What must not depend on the device stays fixed: initial noise is drawn on the
CPU in float32 from the seed and then moved (the same seed gives the same noise everywhere), the
sampler's arithmetic runs in float32, and images come back as float32 on the CPU for the metrics.
"""

from __future__ import annotations

import re

import torch

from .errors import FlexdiffError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"
DTYPE_CHOICES = "auto, " + ", ".join(DTYPES)


def _cuda_missing() -> str:
    built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return f"torch {torch.__version__} ({built}) sees no CUDA GPU here"


def resolve_device(text: str | None = "auto", option: str = "--device") -> torch.device:
    """auto (cuda if available, else mps, else cpu), cpu, cuda, cuda:N or mps; a device this machine lacks
    is refused with one line."""
    name = (text or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    cuda = re.fullmatch(r"cuda(?::(\d+))?", name)
    if cuda:
        if not torch.cuda.is_available():
            raise FlexdiffError(f"{option} {text}: {_cuda_missing()}; use {option} cpu (or auto)")
        index = int(cuda.group(1) or torch.cuda.current_device())
        if index >= torch.cuda.device_count():
            raise FlexdiffError(f"{option} {text}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                f"numbered 0..{torch.cuda.device_count() - 1}")
        return torch.device("cuda", index)
    if name == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise FlexdiffError(f"{option} {text}: no Apple GPU (MPS) is available here; use {option} cpu (or auto)")
        return torch.device("mps")
    raise FlexdiffError(f"{option} {text!r}: accepted values are {DEVICE_CHOICES}")


def resolve_dtype(text: str | None, device: torch.device, option: str = "--dtype") -> torch.dtype:
    """auto (bfloat16 on a CUDA GPU that has it, else float16 on a GPU; float32 on the CPU), or a name."""
    name = (text or "auto").strip().lower()
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if name not in DTYPES:
        raise FlexdiffError(f"{option} {text!r}: accepted values are {DTYPE_CHOICES}")
    return DTYPES[name]


def placement(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of a model's floating-point weights (the CPU and float32 for a model without any)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Put a model on `device` in `dtype`; the dtype is passed on only when it changes (diffusers warns at every
    `to(dtype)`, also a float32 model cast to float32)."""
    if placement(module)[1] != dtype:
        module.to(dtype=dtype)
    return module.to(device)


def to_model(value, device: torch.device, dtype: torch.dtype):
    """A model input on the model's device: floating tensors in its dtype, integer ones (labels) as they are."""
    if isinstance(value, dict):
        return {k: to_model(v, device, dtype) for k, v in value.items()}
    if torch.is_tensor(value):
        return value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
    return value


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing must not stop the clock before the GPU is done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def training_dtype(dtype: torch.dtype, option: str = "--dtype") -> torch.dtype:
    """The autocast dtype of a training run: float32 (none) or bfloat16. float16 would need loss scaling."""
    if dtype == torch.float16:
        raise FlexdiffError(f"{option} float16: training in float16 needs loss scaling, which flexdiff does not do; "
                            "use bfloat16 (autocast, float32 master weights) or float32")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for a forward pass in `dtype` (a no-op context in float32); weights stay float32."""
    import contextlib

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


CPU_FLOAT32 = "cpu-float32"  # what runs from before devices were an option ran on (left out of their identity)


def runs_on(device: torch.device, dtype: torch.dtype) -> str:
    """'cpu-float32', 'cuda-bfloat16', ...: the part of a run's identity that says what it runs on."""
    return f"{device.type}-{dtype_name(dtype)}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def device_name(device: torch.device) -> str:
    """The hardware behind a device, for tables and timing identities (a GPU's product name, or 'cpu')."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def describe(device: torch.device, dtype: torch.dtype) -> str:
    """e.g. 'cpu, float32' or 'cuda:0 (NVIDIA H200), bfloat16'."""
    where = f"{device} ({device_name(device)})" if device.type == "cuda" else str(device)
    return f"{where}, {dtype_name(dtype)}"


def timing_tag(device: torch.device, dtype: torch.dtype) -> str:
    """A file-name-safe identity of what a wall-clock measurement ran on: hardware and dtype."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", f"{device_name(device)}-{dtype_name(dtype)}").strip("_")

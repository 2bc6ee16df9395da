"""Loading diffusers UNets (the shipped default or a user's folder) with clear errors."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from .errors import FlexdiffError
from .io import read_json_object

UNet = UNet2DModel | UNet2DConditionModel

# Architecture of the embedded default (about 1.1 M parameters, 61.7 M MACs per forward):
# class-conditional on the 10 digits, with an 11th, null label for unconditional sampling.
DIGIT_CLASSES = 10
DEFAULT_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=32,
    num_class_embeds=DIGIT_CLASSES + 1,
)

# The noise schedule the default model is trained with (DDPM, linear betas, 1,000 steps).
DEFAULT_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
)


def assets_dir() -> Path:
    return Path(str(resources.files("flexdiff") / "assets"))


def default_model_dir() -> Path:
    return assets_dir() / "default_unet"


def default_mixture_dir() -> Path:
    """The mixture of experts shipped for the default model (built by `flexdiff experts`, see its README)."""
    return assets_dir() / "default_mixture"


@dataclass
class LoadedModel:
    """A UNet plus the scheduler config it was trained with, and where it came from."""

    unet: UNet
    scheduler_config: dict
    path: Path

    @property
    def is_conditional(self) -> bool:
        from .engine import is_mixture

        first = self.unet.experts[0] if is_mixture(self.unet) else self.unet  # a mixture: its experts' class
        return isinstance(first, UNet2DConditionModel)


def load_model(path: Path | str | None = None) -> LoadedModel:
    """Load a UNet2DModel / UNet2DConditionModel from a diffusers folder.

    `path` may be a UNet folder (config.json + weights) or a pipeline folder (model_index.json
    with a `unet/` subfolder and usually `scheduler/`). None means the shipped default.
    """
    path = default_model_dir() if path is None else Path(path)
    if not path.exists():
        raise FlexdiffError(f"--model {path}: no such file or folder")
    if not path.is_dir():
        raise FlexdiffError(f"--model {path}: expected a diffusers model folder, got a file")
    from .experts.mixture import is_mixture, load_mixture

    if is_mixture(path):  # a mixture of experts folder (flexdiff experts): one UNet per timestep interval
        mixture, _ = load_mixture(path)
        return LoadedModel(unet=mixture, scheduler_config=mixture.scheduler_config, path=path)
    unet_dir, sched_file = path, path / "scheduler_config.json"
    if (path / "model_index.json").exists():
        unet_dir = path / "unet"
        sched_file = path / "scheduler" / "scheduler_config.json"
        if not unet_dir.is_dir():
            index = read_json_object(path / "model_index.json", "the pipeline index")
            parts = ", ".join(f"{k}: {v[1] if isinstance(v, list) and len(v) > 1 else v}" for k, v in index.items()
                              if not k.startswith("_"))
            raise FlexdiffError(f"--model {path}: a pipeline folder without a unet/ subfolder ({parts}); flexdiff "
                                "needs a UNet denoiser (UNet2DModel or UNet2DConditionModel)")
    config_file = unet_dir / "config.json"
    if not config_file.exists():
        raise FlexdiffError(
            f"--model {path}: not a diffusers model folder (no config.json"
            f"{' in unet/' if unet_dir != path else ' and no model_index.json'})"
        )
    config = read_json_object(config_file, "the UNet config")
    cls_name = config.get("_class_name")
    classes = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}
    if cls_name not in classes:
        raise FlexdiffError(
            f"{config_file}: _class_name is {cls_name!r}; flexdiff supports "
            f"{', '.join(classes)}"
        )
    if not any(unet_dir.glob("*.safetensors")):
        raise FlexdiffError(
            f"--model {path}: no safetensors weights in {unet_dir} (flexdiff does not unpickle "
            "*.bin files; convert them with diffusers' save_pretrained(safe_serialization=True))"
        )
    try:
        unet = classes[cls_name].from_pretrained(unet_dir, use_safetensors=True, low_cpu_mem_usage=False)
    except FlexdiffError:
        raise
    except Exception as e:  # diffusers raises many kinds for corrupt files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FlexdiffError(f"--model {path}: cannot load the weights ({msg})") from None
    unet.eval().requires_grad_(False)
    sched = check_scheduler_config(read_json_object(sched_file, "the scheduler config"), sched_file) \
        if sched_file.exists() else dict(DEFAULT_SCHEDULER_CONFIG)
    return LoadedModel(unet=unet, scheduler_config=sched, path=path)


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_scheduler_config(config: dict, where: Path | str) -> dict:
    """The noise-schedule fields flexdiff's samplers read, checked here so a bad value names its file."""
    def bad(field, why):
        return FlexdiffError(f"{where}: {field} is {config[field]!r}; {why}")

    T = config.get("num_train_timesteps", 1000)
    if "num_train_timesteps" in config and (isinstance(T, bool) or not isinstance(T, int) or T < 2):
        raise bad("num_train_timesteps", "expected a whole number >= 2")
    for f in ("beta_start", "beta_end"):
        v = config.get(f)
        if f in config and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1):
            raise bad(f, "expected a number between 0 and 1")
    if "beta_start" in config and "beta_end" in config and config["beta_start"] > config["beta_end"]:
        raise bad("beta_start", f"it must not exceed beta_end ({config['beta_end']!r})")
    if "beta_schedule" in config and config["beta_schedule"] not in BETA_SCHEDULES:
        raise bad("beta_schedule", f"accepted values are {', '.join(BETA_SCHEDULES)}")
    if "prediction_type" in config and config["prediction_type"] not in PREDICTION_TYPES:
        raise bad("prediction_type", f"accepted values are {', '.join(PREDICTION_TYPES)}")
    return config


def build_default_unet(seed: int = 0, **overrides) -> UNet2DModel:
    """A freshly initialised UNet with the default architecture (for training)."""
    torch.manual_seed(seed)
    return UNet2DModel(**{**DEFAULT_UNET_CONFIG, **overrides})


def save_model(unet: UNet, scheduler_config: dict, out_dir: Path) -> Path:
    """`save_pretrained` layout (safetensors) plus the scheduler config beside it."""
    from .io import write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out_dir, safe_serialization=True)
    write_json(out_dir / "scheduler_config.json", scheduler_config)
    return out_dir


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A short hash of every parameter and buffer: part of a run's identity (what it runs on)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def data_fingerprint(*tensors: torch.Tensor | None) -> str:
    """A short hash of training data (images, labels): part of a run's identity."""
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]

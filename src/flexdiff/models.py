"""Loading diffusers UNets (the shipped default or a user's folder) with clear errors."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import diffusers
import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel, UNet2DModel

from .conditioning import LABEL_TOKENS_FILE, LabelTokens, label_tokens_record, read_label_tokens, takes_text
from .errors import FlexdiffError
from .io import load_strict, read_json_object
from .mixture import experts_of, is_mixture_folder, load_mixture
from .pipelines import PipelineParts, needs_parts, pipeline_index, side_networks
from .samplers import DEFAULT_SCHEDULER_CONFIG, check_scheduler_config

UNet = UNet2DModel | UNet2DConditionModel
# the denoiser classes flexdiff loads and cuts (anatomy.py, transformer_anatomy.py)
DENOISER_CLASSES = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "PixArtTransformer2DModel",
                    "SD3Transformer2DModel", "FluxTransformer2DModel")

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

# The default transformer: FLUX-shaped (2 dual-stream then 6 single-stream blocks of 4 heads x 24, rotary
# positions, flow matching), class-conditional through one-hot label tokens (conditioning.LabelTokens; 10 digits +
# the null label) in place of T5 / CLIP. 16 x 16 x 1 images packed as FLUX packs latents: 8 x 8 tokens of 4.
DEFAULT_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=4,
    num_layers=2,
    num_single_layers=6,
    attention_head_dim=24,
    num_attention_heads=4,
    joint_attention_dim=DIGIT_CLASSES + 1,
    pooled_projection_dim=DIGIT_CLASSES + 1,
    guidance_embeds=False,
    axes_dims_rope=(4, 10, 10),
)
DEFAULT_TRANSFORMER_SIZE = 16  # FLUX's config has no sample size: label_tokens.json holds it
DEFAULT_LABEL_TOKENS = LabelTokens(DIGIT_CLASSES + 1)


def assets_dir() -> Path:
    return Path(str(resources.files("flexdiff") / "assets"))


def default_model_dir() -> Path:
    return assets_dir() / "default_unet"


def default_transformer_dir() -> Path:
    """The transformer shipped beside the UNet (FLUX-shaped, flow matching; see its README)."""
    return assets_dir() / "default_transformer"


# names `--model` accepts beside folders (a folder of the same name, where one exists, wins)
NAMED_MODELS = {"default": default_model_dir, "default-transformer": default_transformer_dir}


def default_mixture_dir() -> Path:
    """The mixture of experts shipped for the default model (built by `flexdiff experts`, see its README)."""
    return assets_dir() / "default_mixture"


@dataclass
class LoadedModel:
    """A UNet plus the scheduler config it was trained with, where it came from, and (a pipeline
    folder) its decoder and text encoders."""

    unet: UNet
    scheduler_config: dict
    path: Path
    parts: PipelineParts | None = None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "LoadedModel":
        """Move the denoiser and the pipeline's other parts (in place); None keeps what they have."""
        from .devices import move, placement

        here, kind = placement(self.unet)
        device, dtype = torch.device(device) if device is not None else here, dtype or kind
        move(self.unet, device, dtype)
        if self.parts is not None:
            self.parts.to(device, dtype)
        return self

    @property
    def is_conditional(self) -> bool:
        return takes_text(experts_of(self.unet)[0])  # a mixture: its experts' class

    @property
    def is_latent(self) -> bool:
        return self.parts is not None and self.parts.decoder is not None

    @property
    def has_text(self) -> bool:
        return self.parts is not None and self.parts.has_text

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Samples as images in [-1, 1]: latents go through the pipeline's decoder, pixels pass."""
        return self.parts.decode(samples) if self.is_latent else samples

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images it makes (decoded, for a latent model)."""
        if self.is_latent:
            size = self.parts.image_size
            return (int(self.parts.decoder.config.out_channels), size, size)
        from .anatomy import noise_shape

        return noise_shape(self.unet)  # pixels: what it samples

    @property
    def cross_attention_len(self) -> int:
        """Text tokens per prompt (what MACs are counted on): the tokenizer's length, else CLIP's 77."""
        return self.parts.prompt_length() if self.has_text else 77


def load_model(path: Path | str | None = None, option: str = "--model", device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a UNet2DModel / UNet2DConditionModel from a diffusers folder.

    `path` may be a UNet folder (config.json + weights) or a pipeline folder (model_index.json
    with a `unet/` subfolder and usually `scheduler/`). None means the shipped default. `option`: the
    command-line option the path came from, named in errors. `device` / `dtype`: where the model (and a
    pipeline's decoder and text encoders) runs; None keeps the CPU and the stored weights' float32.
    """
    loaded = _load(path, option)
    if device is not None or dtype is not None:
        loaded.to(device, dtype)
    return loaded


def _load(path: Path | str | None, option: str) -> LoadedModel:
    if path is None:
        path = default_model_dir()
    elif not Path(path).exists() and str(path) in NAMED_MODELS:
        name, path = str(path), NAMED_MODELS[str(path)]()
        if not path.exists():
            raise FlexdiffError(f"{option} {name}: not shipped in this version of flexdiff (no folder {path}); "
                                "pass a model folder")
    path = Path(path)
    if not path.exists():
        raise FlexdiffError(f"{option} {path}: no such file or folder")
    if not path.is_dir():
        raise FlexdiffError(f"{option} {path}: expected a diffusers model folder, got a file")
    if is_mixture_folder(path):  # a mixture of experts folder (flexdiff experts): one UNet per timestep interval
        mixture, man = load_mixture(path)
        parts = None
        decoder_from = man.get("pipeline")  # pruned from a latent pipeline: its decoder is kept inside the folder
        if decoder_from is not None:
            where = (path / str(decoder_from)).resolve()
            if not isinstance(decoder_from, str) or path.resolve() not in where.parents:
                raise FlexdiffError(f"{path}/mixture.json: pipeline is {decoder_from!r}; it must name a subfolder of "
                                    "the mixture folder (a mixture from an earlier flexdiff pointed at its pipeline: "
                                    "copy that pipeline's folder, without unet/, into pipeline/ here and set "
                                    "\"pipeline\": \"pipeline\")")
            if not needs_parts(pipeline_index(where)):
                raise FlexdiffError(f"{path}/mixture.json: its latents decode with the pipeline in {decoder_from}/, "
                                    "which is missing or holds no decoder")
            parts = PipelineParts.load(where, mixture.experts[0])
        return LoadedModel(unet=mixture, scheduler_config=mixture.scheduler_config, path=path, parts=parts)
    unet_dir, sched_file = path, path / "scheduler_config.json"
    if (path / "model_index.json").exists():
        index = read_json_object(path / "model_index.json", "the pipeline index")
        unet_dir = path / ("transformer" if "transformer" in index else "unet")
        sched_file = path / "scheduler" / "scheduler_config.json"
        guided_by = side_networks(pipeline_index(path))
        if guided_by:  # sampling its UNet alone would silently drop the control
            raise FlexdiffError(f"{option} {path}: a pipeline whose denoiser is steered by a {guided_by} at every "
                                "step; flexdiff's commands sample the denoiser alone. Run it through diffusers with "
                                "flexdiff.apply_schedule(pipe, schedule) (README: Python API), which also skips the "
                                f"{guided_by} on null steps")
        if not unet_dir.is_dir():
            parts = ", ".join(f"{k}: {v[1] if isinstance(v, list) and len(v) > 1 else v}" for k, v in index.items()
                              if not k.startswith("_"))
            raise FlexdiffError(f"{option} {path}: a pipeline folder without a unet/ or transformer/ subfolder "
                                f"({parts}); flexdiff needs its denoiser ({', '.join(DENOISER_CLASSES)})")
    config_file = unet_dir / "config.json"
    if not config_file.exists():
        raise FlexdiffError(
            f"{option} {path}: not a diffusers model folder (no config.json"
            f"{' in ' + unet_dir.name + '/' if unet_dir != path else ' and no model_index.json'})"
        )
    config = read_json_object(config_file, "the denoiser config")
    for field in ("sample_size", "in_channels", "out_channels"):
        v = config.get(field)
        if field in config and not (type(v) is int and v > 0) and not (field in ("sample_size", "out_channels")
                                                                         and v is None):
            raise FlexdiffError(f"{config_file}: {field} is {v!r}; expected a whole number above 0")
    cls_name = config.get("_class_name")
    if cls_name not in DENOISER_CLASSES:
        raise FlexdiffError(
            f"{config_file}: _class_name is {cls_name!r}; flexdiff supports {', '.join(DENOISER_CLASSES)}"
        )
    if not any(unet_dir.glob("*.safetensors")):
        raise FlexdiffError(
            f"{option} {path}: no safetensors weights in {unet_dir} (flexdiff does not unpickle "
            "*.bin files; convert them with diffusers' save_pretrained(safe_serialization=True))"
        )
    if cls_name not in ("UNet2DModel", "UNet2DConditionModel") and not sched_file.exists():
        raise FlexdiffError(f"{option} {path}: no {sched_file.relative_to(path)}; a transformer's noise schedule "
                            "(flow matching or DDPM, its shift) cannot be guessed: save its scheduler's config there "
                            "(scheduler.save_config)")
    unet = load_strict(getattr(diffusers, cls_name), unet_dir, f"{option} {path}")
    unet.eval().requires_grad_(False)
    read_label_tokens(unet, unet_dir)  # a transformer that takes class labels as one-hot tokens (the default one)
    sched = check_scheduler_config(read_json_object(sched_file, "the scheduler config"), sched_file) \
        if sched_file.exists() else dict(DEFAULT_SCHEDULER_CONFIG)
    index = pipeline_index(path)
    parts = PipelineParts.load(path, unet) if needs_parts(index) else None
    return LoadedModel(unet=unet, scheduler_config=sched, path=path, parts=parts)


def build_default_unet(seed: int = 0, **overrides) -> UNet2DModel:
    """A freshly initialised UNet with the default architecture (for training)."""
    torch.manual_seed(seed)
    return UNet2DModel(**{**DEFAULT_UNET_CONFIG, **overrides})


def build_default_transformer(seed: int = 0, **overrides) -> FluxTransformer2DModel:
    """A freshly initialised transformer with the default transformer's architecture (for training), carrying
    its label tokens and image size as a loaded one does."""
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**{**DEFAULT_TRANSFORMER_CONFIG, **overrides})
    model.flexdiff_label_tokens, model.flexdiff_latent_size = DEFAULT_LABEL_TOKENS, DEFAULT_TRANSFORMER_SIZE
    return model


def save_model(unet, scheduler_config: dict, out_dir: Path, tokens: LabelTokens | None = None) -> Path:
    """`save_pretrained` layout (safetensors) plus the scheduler config beside it (and, for a transformer
    that takes its labels as tokens, `label_tokens.json`)."""
    from .io import write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out_dir, safe_serialization=True)
    write_json(out_dir / "scheduler_config.json", scheduler_config)
    record = label_tokens_record(unet, tokens)  # given, or what the model was loaded or cut out with
    if record is not None:
        write_json(out_dir / LABEL_TOKENS_FILE, record)
    return out_dir

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

torch.set_num_threads(2)


def tiny_unet(seed: int = 0, layers_per_block: int = 1) -> UNet2DModel:
    """A random UNet2DModel with the default's layout, small enough for fast tests (1x16x16 images)."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16, 16),
        layers_per_block=layers_per_block, norm_num_groups=4, attention_head_dim=8,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    ).eval().requires_grad_(False)


def tiny_cond_unet(seed: int = 0) -> UNet2DConditionModel:
    """A random text-conditional UNet (Stable Diffusion layout, tiny)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        layers_per_block=2, norm_num_groups=4, cross_attention_dim=12, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval().requires_grad_(False)


@pytest.fixture
def unet():
    return tiny_unet()


@pytest.fixture
def cond_unet():
    return tiny_cond_unet()


@pytest.fixture
def sched_cfg():
    from flexdiff.samplers import DEFAULT_SCHEDULER_CONFIG

    return dict(DEFAULT_SCHEDULER_CONFIG)


@pytest.fixture
def tiny_model_dir(tmp_path, sched_cfg):
    from flexdiff.models import save_model

    return save_model(tiny_unet(), sched_cfg, tmp_path / "tiny_model")


def tiny_class_unet(seed: int = 0, classes: int = 3) -> UNet2DModel:
    """The tiny UNet, class-conditional: `classes` labels plus the null label (the default's layout)."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16, 16),
        layers_per_block=1, norm_num_groups=4, attention_head_dim=8, num_class_embeds=classes + 1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    ).eval().requires_grad_(False)


@pytest.fixture
def class_model_dir(tmp_path, sched_cfg):
    from flexdiff.models import save_model

    return save_model(tiny_class_unet(), sched_cfg, tmp_path / "tiny_class_model")

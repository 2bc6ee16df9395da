"""flexdiff: faster sampling for pretrained diffusion models.

Flexible full / partial / null step schedules (Flexiffusion) run on an unmodified diffusers
UNet through removable hooks (see `flexdiff.engine`).
"""

from .engine import StepEngine, apply_schedule
from .schedule import FULL, NULL, Schedule, Step, StepKind, partial

__all__ = ["FULL", "NULL", "Schedule", "Step", "StepKind", "StepEngine", "apply_schedule", "partial"]
__version__ = "0.1.0"

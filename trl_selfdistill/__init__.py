"""Self-distillation SFT for TRL: learn new facts without forgetting the old ones (arXiv 2604.15574)."""

from .budget import ForgettingBudgetCallback
from .config import SelfDistillConfig
from .freezing import FreezeConfig, FreezeReport, apply_freeze
from .knowledge import ForgettingCallback
from .trainer import SelfDistillSFTTrainer

__all__ = [
    "ForgettingBudgetCallback",
    "FreezeConfig",
    "FreezeReport",
    "ForgettingCallback",
    "SelfDistillConfig",
    "SelfDistillSFTTrainer",
    "apply_freeze",
]
__version__ = "0.1.0"

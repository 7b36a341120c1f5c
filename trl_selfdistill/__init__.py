"""Self-distillation SFT for TRL: learn new facts without forgetting the old ones (arXiv 2604.15574)."""

from .config import SelfDistillConfig
from .trainer import SelfDistillSFTTrainer

__all__ = ["SelfDistillConfig", "SelfDistillSFTTrainer"]
__version__ = "0.1.0"

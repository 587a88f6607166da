"""emloc: fine-tune a model far larger than your GPU through an emulator and LoRA correction (EMLoC)."""
from .layers import EmulatorLinear
from .memory import Plan, plan

__all__ = ["EmulatorLinear", "Plan", "plan"]

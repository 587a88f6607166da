"""emloc: fine-tune a model far larger than your GPU through an emulator and LoRA correction (EMLoC)."""
from .build import build_emulator, load_emulator
from .correction import correct_lora
from .export import export, export_adapter, merge_adapter
from .layers import EmulatorLinear
from .lora import LoraAdapter, add_lora
from .memory import Plan, plan
from .pipeline import run
from .training import TrainConfig, train

__all__ = ["EmulatorLinear", "LoraAdapter", "Plan", "TrainConfig", "add_lora", "build_emulator", "correct_lora",
           "export", "export_adapter", "load_emulator", "merge_adapter", "plan", "run", "train"]

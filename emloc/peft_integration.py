"""PEFT on an emulator: :class:`EmulatorLinear` registered as a custom LoRA layer type, so that
``peft.get_peft_model(emulator, config)`` puts LoRA on it and runs the fused ``emulator_linear`` kernel.

    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(emulator, register_emulator_lora(config))

This uses PEFT's custom-module mechanism (``LoraConfig._register_custom_module``, see PEFT's "custom models"
guide). Only plain LoRA is supported on emulator layers (no DoRA or other variants, no LoRA bias); merging
into the emulator is refused because its weight exists only as factors.
"""
from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import LoraConfig, LoraLayer
from torch import nn

from emloc_kernels import emulator_linear

from .layers import EmulatorLinear


class EmulatorLoraLayer(nn.Module, LoraLayer):
    """PEFT LoRA layer around an :class:`EmulatorLinear` base: one active adapter without dropout runs fused."""

    def __init__(self, base_layer: EmulatorLinear, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        if config.use_dora or config.lora_bias:
            raise ValueError("EmulatorLinear supports plain LoRA only: use_dora and lora_bias must be off")
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base: EmulatorLinear = self.get_base_layer()
        active = [name for name in self.active_adapters if name in self.lora_A]
        if self.disable_adapters or not active:
            return base(x, *args, **kwargs)
        fused = len(active) == 1 and isinstance(self.lora_dropout[active[0]], nn.Identity) and base.lora_a is None
        if fused:
            name = active[0]
            return emulator_linear(x, base.v, base.u, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                   self.scaling[name])
        result = base(x, *args, **kwargs)
        for name in active:
            lora_x = self.lora_dropout[name](x).to(self.lora_A[name].weight.dtype)
            result = result + (self.lora_B[name](self.lora_A[name](lora_x)) * self.scaling[name]).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise TypeError("an EmulatorLinear has no dense weight to merge LoRA into; correct the adapter "
                        "(emloc.correct_lora) and merge it into the original model (emloc.export)")

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register_emulator_lora(config: LoraConfig) -> LoraConfig:
    """Register :class:`EmulatorLoraLayer` for :class:`EmulatorLinear` targets on ``config``; returns it."""
    config._register_custom_module({EmulatorLinear: EmulatorLoraLayer})
    return config

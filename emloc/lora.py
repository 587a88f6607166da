"""LoRA on an emulator: injection into its linears, and the adapter as weights that travel between stages.

Emulator layers (:class:`emloc.EmulatorLinear`) carry their LoRA inside the fused kernel; dense
``nn.Linear`` layers that match the target become :class:`LoraLinear`, an ``nn.Linear`` with the same LoRA
weights (:class:`emloc.layers.LoraWeights`: ``lora_a`` / ``lora_b``), so both kinds keep their original
parameter names and every later stage (checkpoints, correction, export) reads them the same way. LoRA weights
are kept in fp32 whatever the base dtype: an update of ``lr * step`` on a bf16 weight would mostly round away.

:class:`LoraAdapter` is a trained (or corrected) adapter detached from any model, saved in PEFT's format:
``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` (``(r, in)``) and ``...lora_B.weight`` (``(out, r)``).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .errors import UserError
from .files import atomic_directory, read_json
from .layers import EmulatorLinear, LoraWeights, lora_scaling
from .models import block_stack
from .ranks import LORA_RANK
from .streaming import check_finite_weight, read_header, read_tensors
from .vision import is_vision_language

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EMLOC_INFO = "emloc_adapter.json"
_PEFT_PREFIX = "base_model.model."


class LoraLinear(LoraWeights, nn.Linear):
    """A dense ``nn.Linear`` with LoRA: ``y = x W^T + b + s * (dropout(x) A^T) B^T``.

    Shares the weight and bias of the layer it replaces, so parameter names and state-dict keys are
    unchanged; its LoRA weights are those of :class:`EmulatorLinear` (:class:`emloc.layers.LoraWeights`).
    """

    @classmethod
    def wrap(cls, linear: nn.Linear) -> LoraLinear:
        """A LoraLinear holding ``linear``'s own weight and bias (no copy, nothing trains yet)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.remove_lora()
        return layer

    def _lora_like(self) -> Tensor:
        return self.weight

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        if self.lora_a is None:
            return y
        return y + self.lora_delta(x).to(y.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._lora_repr()



def _matches(name: str, target: re.Pattern | list[str] | tuple[str, ...]) -> bool:
    # PEFT's convention: a string is a regular expression matched against the whole name; a list holds
    # module names or name suffixes (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``).
    if isinstance(target, re.Pattern):
        return target.fullmatch(name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def _candidate_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every emulator or dense linear of ``model``, except its output embedding (the LM head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (EmulatorLinear, nn.Linear)) and module is not head}


def add_lora(model: nn.Module, target: str | list[str] | None = None, r: int = LORA_RANK, alpha: float | None = None,
             dropout: float = 0.0, rslora: bool = False, dtype: torch.dtype = torch.float32) -> list[str]:
    """Attach LoRA to the linears of ``model`` named by ``target`` and freeze everything else.

    Args:
        model: an emulator (or any model); its matching :class:`EmulatorLinear` layers get LoRA fused into
            their kernel, matching dense ``nn.Linear`` layers become :class:`LoraLinear`.
        target: a regular expression over full module names, or a list of names / name suffixes; by default
            every linear except the LM head (docs/design.md §1.8: all attention and MLP linears).
        r, alpha, rslora: rank and scaling (``alpha / r``, or ``alpha / sqrt(r)``); ``alpha`` defaults to ``r``.
        dropout: LoRA dropout probability.
        dtype: dtype of the LoRA weights (fp32 by default, whatever the base dtype).

    Returns the names of the modules that got LoRA. Raises :class:`~emloc.errors.UserError` if ``target``
    matches none.
    """
    if r < 1:
        raise UserError(f"add_lora: the LoRA rank r must be at least 1, got {r}")
    candidates = _candidate_linears(model)
    names = target_modules(model, target)
    model.requires_grad_(False)
    for name in names:
        module = candidates[name]
        if not isinstance(module, LoraWeights):
            module = LoraLinear.wrap(module)
            model.set_submodule(name, module)
        module.add_lora(r, alpha, dropout, rslora, dtype=dtype)
    return names


def target_modules(model: nn.Module, target: str | list[str] | None) -> list[str]:
    """The names of the linears of ``model`` that ``target`` selects (see :func:`add_lora`). Module names are
    the same in the original model and its emulator, so a run checks its target on the original's meta
    skeleton before building anything. Raises :class:`~emloc.errors.UserError` for an invalid regular
    expression or a target that matches no linear. With no target, a vision-language model gets LoRA on its
    decoder blocks only (a target naming the vision tower's linears puts it there too)."""
    candidates = _candidate_linears(model)
    if target is None and is_vision_language(getattr(model, "config", None)):
        target = re.compile(re.escape(block_stack(model)[0]) + r"\..*")
    if isinstance(target, str):
        try:
            target = re.compile(target)
        except re.error as exc:
            raise UserError(f"add_lora: target {target!r} is not a valid regular expression ({exc})") from None
    names = [name for name in candidates if target is None or _matches(name, target)]
    if not names:
        some = ", ".join(list(candidates)[:6]) or "none"
        shown = target.pattern if isinstance(target, re.Pattern) else target
        raise UserError(f"add_lora: target {shown!r} matches no linear layer of the model (linears: {some}, ...)")
    return names


def emulator_record(model: nn.Module) -> dict:
    """What an adapter trained on ``model`` records of it: the emulator's path and content hash (from the
    ``emloc`` section of its config), so that correction can refuse another emulator. Empty for a model
    that is not an emulator, or one built before emulators recorded a content hash."""
    section = getattr(getattr(model, "config", None), "emloc", None)
    if not isinstance(section, dict) or "content_hash" not in section:
        return {}
    return {"emulator": {"path": getattr(model.config, "_name_or_path", None),
                         "content_hash": section["content_hash"]}}


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` that carry LoRA weights, by name."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, LoraWeights) and module.lora_a is not None}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA weights of ``model`` in a fixed order (``lora_a``, ``lora_b`` per module)."""
    return [p for module in lora_modules(model).values() for p in (module.lora_a, module.lora_b)]


@dataclass
class LoraAdapter:
    """LoRA weights detached from a model: ``weights[name] = (A (r, in), B (out, r))`` and their scaling.

    Saved and loaded in PEFT's adapter format, so a corrected adapter loads with
    ``peft.PeftModel.from_pretrained(original_model, directory)``.
    """

    weights: dict[str, tuple[Tensor, Tensor]]
    r: int
    alpha: float
    rslora: bool = False
    dropout: float = 0.0
    base_model: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.rslora)

    @property
    def trained_on(self) -> Path | None:
        """The emulator directory the adapter was trained on last (a refresh's, docs/design.md §1.9), as its
        emloc record names it; None when it records none."""
        path = self.extra.get("emulator", {}).get("path")
        return Path(path) if path else None

    @classmethod
    def from_model(cls, model: nn.Module, alpha: float | None = None, rslora: bool = False,
                   base_model: str | None = None) -> LoraAdapter:
        """Copy the LoRA weights of ``model`` as fp32 CPU tensors.

        Every LoRA module must share one rank and scaling. ``alpha`` and ``rslora`` name how that scaling was
        formed (checked against it); without ``alpha`` the adapter records ``alpha = s * r`` (same scaling).
        On an emulator, the adapter records which one (:func:`emulator_record`).
        """
        modules = lora_modules(model)
        if not modules:
            raise UserError("LoraAdapter.from_model: the model carries no LoRA weights (call add_lora first)")
        ranks = {m.lora_a.shape[0] for m in modules.values()}
        scalings = {m.lora_scaling for m in modules.values()}
        if len(ranks) != 1 or len(scalings) != 1:
            raise UserError(f"LoraAdapter.from_model: LoRA modules differ in rank {ranks} or scaling {scalings}")
        r, scaling = ranks.pop(), scalings.pop()
        if alpha is None:
            alpha, rslora = scaling * r, False
        elif not math.isclose(lora_scaling(r, alpha, rslora), scaling, rel_tol=1e-12):
            raise UserError(f"LoraAdapter.from_model: alpha={alpha}, rslora={rslora} give scaling "
                             f"{lora_scaling(r, alpha, rslora)}, but the model's LoRA scaling is {scaling}")
        weights = {name: (m.lora_a.detach().float().cpu().clone(), m.lora_b.detach().float().cpu().clone())
                   for name, m in modules.items()}
        return cls(weights, r=r, alpha=float(alpha), rslora=rslora,
                   dropout=next(iter(modules.values())).lora_dropout, base_model=base_model,
                   extra=emulator_record(model))

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT format), and the emloc record
        ``emloc_adapter.json`` when there is one, into a fresh directory that then takes ``directory``'s place
        (:func:`emloc.files.atomic_directory`): no file of an older adapter stays beside them."""
        tensors = {}
        for name, (a, b) in self.weights.items():
            tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous()
            tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous()
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base_model,
            "r": self.r, "lora_alpha": self.alpha, "use_rslora": self.rslora, "lora_dropout": self.dropout,
            "target_modules": sorted(self.weights), "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True,
        }

        def write(temp: Path) -> None:
            save_file(tensors, str(temp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            (temp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
            if self.extra:  # kept out of adapter_config.json, whose keys PEFT checks
                (temp / EMLOC_INFO).write_text(json.dumps(self.extra, indent=2))

        return atomic_directory(directory, write, holds=ADAPTER_CONFIG)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> LoraAdapter:
        """Read an adapter saved by :meth:`save` (or by PEFT, for a plain LoRA without biases). Raises
        :class:`~emloc.errors.UserError` naming the file for anything missing, truncated or non-finite."""
        directory = Path(directory)
        config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"LoRA adapter: {path} does not exist")
        config = read_json(config_path)
        if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
            raise UserError(f"LoRA adapter {config_path}: not a LoRA adapter config (peft_type "
                            f"{config.get('peft_type') if isinstance(config, dict) else None!r})")
        try:
            r, alpha = int(config["r"]), float(config["lora_alpha"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(
                f"LoRA adapter {config_path}: needs integer 'r' and number 'lora_alpha' ({exc!r})") from None
        keys = [key for key in read_header(weights_path)[0] if key != "__metadata__"]
        pairs: dict[str, dict[str, Tensor]] = {}
        for key, tensor in read_tensors(weights_path, keys):
            match = re.fullmatch(rf"{re.escape(_PEFT_PREFIX)}(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
            if match is None:
                raise UserError(f"LoRA adapter {weights_path}: unexpected key {key!r}")
            check_finite_weight(tensor, key, weights_path)
            pairs.setdefault(match[1], {})[match[2]] = tensor
        weights = {}
        for name, pair in pairs.items():
            if set(pair) != {"A", "B"}:
                raise UserError(f"LoRA adapter {weights_path}: module {name!r} has lora_{''.join(pair)} only")
            a, b = pair["A"], pair["B"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
                raise UserError(f"LoRA adapter {weights_path}: module {name!r} has lora_A {tuple(a.shape)} and "
                                f"lora_B {tuple(b.shape)}, which do not fit rank r={r}")
            weights[name] = (a, b)
        extra = read_json(directory / EMLOC_INFO) if (directory / EMLOC_INFO).is_file() else {}
        return cls(weights, r=r, alpha=alpha, rslora=bool(config.get("use_rslora", False)),
                   dropout=float(config.get("lora_dropout", 0.0)), base_model=config.get("base_model_name_or_path"),
                   extra=extra)

    def within(self, prefix: str) -> LoraAdapter:
        """The weights of the modules under ``prefix`` (a module name such as ``model.layers.3``), named
        relative to it: the adapter of that one submodule."""
        start = f"{prefix}."
        weights = {name.removeprefix(start): pair for name, pair in self.weights.items() if name.startswith(start)}
        return replace(self, weights=weights, extra={})

    def content_hash(self) -> str:
        """SHA-256 of the rank, scaling and every module's weights: what a build calibrated with it records."""
        digest = hashlib.sha256(json.dumps([self.r, self.scaling]).encode())
        for name in sorted(self.weights):
            digest.update(name.encode())
            for tensor in self.weights[name]:
                digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    @contextlib.contextmanager
    def attached(self, module: nn.Module):
        """For the block, these LoRA weights add to the outputs of ``module``'s linears (names relative to it),
        by forward hooks: ``out + s (x A^T) B^T`` in the LoRA's fp32, as on a :class:`LoraLinear`, while the
        linears stay as they are. A refresh calibrates the original's blocks so (docs/design.md §1.9)."""
        handles = []
        try:
            for name, (a, b) in self.weights.items():
                linear = module.get_submodule(name)
                if not isinstance(linear, nn.Linear) or a.shape[1] != linear.in_features or \
                        b.shape[0] != linear.out_features:
                    raise UserError(f"LoRA adapter: {name} has lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}, "
                                    f"which do not fit the layer {linear}")
                device = linear.weight.device
                handles.append(linear.register_forward_hook(
                    functools.partial(_add_lora, a.to(device), b.to(device), self.scaling)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def apply_to(self, model: nn.Module) -> None:
        """Attach these LoRA weights to ``model`` (emulator or original), by module name, with their scaling."""
        modules = _candidate_linears(model)
        missing = sorted(set(self.weights) - set(modules))
        if missing:
            raise UserError(f"LoRA adapter: modules {missing[:5]} are not linear layers of the model")
        add_lora(model, target=list(self.weights), r=self.r, alpha=self.alpha, rslora=self.rslora)
        for name, module in lora_modules(model).items():
            a, b = self.weights[name]
            if a.shape != module.lora_a.shape or b.shape != module.lora_b.shape:
                raise UserError(f"LoRA adapter: {name} has lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}; "
                                 f"the model's layer needs {tuple(module.lora_a.shape)}, {tuple(module.lora_b.shape)}")
            with torch.no_grad():
                module.lora_a.copy_(a)
                module.lora_b.copy_(b)



def _add_lora(a: Tensor, b: Tensor, scaling: float, module: nn.Module, args, out: Tensor) -> Tensor:
    """The forward hook of :meth:`LoraAdapter.attached`: the linear's output plus its LoRA term."""
    return out + (scaling * (args[0].to(a.dtype) @ a.T) @ b.T).to(out.dtype)

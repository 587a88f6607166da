"""The per-block steps of the build: calibrate a block, run it, check its activations for NaN or Inf,
compress its planned linears, or give them empty factors for saved ones to be loaded into.

Each takes one block, its inputs and its covariances, avoids host syncs on the per-token path, and runs on
meta tensors as a dry run (:mod:`emloc.memory.dry_run`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from emloc_kernels import Whitening, covariance_update, projected_lowrank, whitened_lowrank, whitening
from emloc_kernels.lowrank import Method

from ..errors import BuildError
from ..layers import EmulatorLinear
from .plan import LinearPlan, covariance_keys

__all__ = ["BlockInput", "Sink", "calibrate_block", "check_finite", "compress_block", "emulate_block", "run_block"]

Sink = Callable[[int, Tensor], None]


@dataclass
class BlockInput:
    """One micro-batch entering a block: hidden states, the block's keyword arguments, the padding mask."""

    hidden: Tensor
    kwargs: dict
    mask: Tensor


def calibrate_block(block: nn.Module, plan: list[list[LinearPlan]], inputs: Iterable[BlockInput],
                    covariances: dict[str, Tensor] | None = None, sink: Sink | None = None) -> dict[str, Tensor]:
    """Run ``inputs`` through ``block`` and accumulate, without host syncs, one fp32 covariance per input
    group that has a linear taking the whitened route (key ``"in:<first linear>"``), and the output
    covariance (without bias) of every linear taking the output route (key ``"out:<linear>"``).

    With a refresh's LoRA attached by forward hooks (:meth:`emloc.lora.LoraAdapter.attached`, docs/design.md
    §1.9) the input covariances are of the shifted activations and the output covariances of ``W x`` alone.
    Padding tokens (``mask`` False) never enter a covariance. ``sink(i, output)``, when given, receives the
    block output of the i-th input as soon as it exists (so outputs need not pile up on the device).
    Returns the covariances. Runs on meta tensors too.
    """
    device = next(block.parameters()).device
    if covariances is None:
        covariances = {key: torch.zeros(size, size, dtype=torch.float32, device=device)
                       for group in plan for key, size in covariance_keys(group)}
    current: dict[str, Tensor] = {}
    hooks = []

    def input_hook(key):
        def hook(module, args):  # returns None: the linear's input is left untouched
            covariance_update(covariances[key], args[0], current["mask"])
        return hook

    def output_hook(key):
        def hook(module, args, out):
            y = out if module.bias is None else out - module.bias
            covariance_update(covariances[key], y, current["mask"])
        return hook

    for group in plan:
        for key, _ in covariance_keys(group):
            kind, name = key.split(":", 1)
            module = block.get_submodule(name)
            # prepended: the output hook runs before any other forward hook of the linear (a refresh's LoRA,
            # which adds to the output), so the output covariance is of the linear's own W x
            hooks.append(module.register_forward_pre_hook(input_hook(key)) if kind == "in"
                         else module.register_forward_hook(output_hook(key), prepend=True))
    try:
        with torch.no_grad():
            for slot, item in enumerate(inputs):
                current["mask"] = item.mask
                out = block(item.hidden, **item.kwargs)
                if sink is not None:
                    sink(slot, out)
    finally:
        for handle in hooks:
            handle.remove()
    return covariances


def run_block(block: nn.Module, inputs: Iterable[BlockInput], sink: Sink) -> None:
    """Pass ``sink(i, output)`` the block's output for each of ``inputs`` (no covariances)."""
    with torch.no_grad():
        for slot, item in enumerate(inputs):
            sink(slot, block(item.hidden, **item.kwargs))


def compress_block(block: nn.Module, plan: list[list[LinearPlan]], covariances: dict[str, Tensor],
                   svd: Method = "exact", seed: int = 0, damping: float = 0.0) -> dict[str, dict]:
    """Replace each planned linear of ``block`` by an :class:`EmulatorLinear` in the block's dtype, taking the
    smaller eigenproblem to the same optimum: output space (docs/design.md §1.4) for ``out <= in``, from the
    accumulated output covariance or from ``W C W^T``; otherwise the whitened form, with one whitening
    (eigendecomposition) per input group shared by its linears. Returns ``{name: {"rank", "form", "error"}}``
    where ``error`` is the relative reconstruction error ``||(W - u v) X^T|| / ||W X^T||`` on the calibration
    data from the factorisation's spectrum, a 0-d tensor (no host sync; meta on a dry run).

    ``damping`` > 0 factors against ``C + damping * (tr C / n) I`` instead of ``C`` (docs/design.md §1.2): the
    emulator then also keeps some of ``W`` in directions the calibration samples barely excite, where a task
    LoRA's changes to the hidden states will go. On an accumulated output covariance the same term is
    ``damping * (tr Y^T Y / tr W W^T) W W^T``. Changes the covariances in place.

    Consumes ``covariances``: each is removed from the dict as soon as no remaining linear reads it, so that
    its memory goes back before the next eigenproblem."""
    reports = {}
    for group in plan:
        key, shared = f"in:{group[0].name}", None
        if damping and key in covariances:
            _damp(covariances[key], damping)
        for position, linear in enumerate(group):
            module = block.get_submodule(linear.name)
            weight = module.weight.float()
            generator = _generator(seed, weight.device)
            if linear.form == "output":
                out_cov = covariances.pop(f"out:{linear.name}")
                if damping:
                    _damp_output(out_cov, weight, damping)
            elif linear.out_features <= linear.in_features:
                out_cov = weight @ covariances[key] @ weight.T  # Y^T Y without whitening
            else:
                out_cov = None
                if shared is None:
                    shared = whitening(covariances[key])
            if not any(_reads_input_covariance(later, shared) for later in group[position + 1:]):
                covariances.pop(key, None)  # before this linear's eigenproblem: one n x n less at its peak
            if out_cov is not None:
                u, v, error = projected_lowrank(weight, out_cov, linear.rank, svd, generator=generator,
                                                with_error=True)
            else:
                u, v, error = whitened_lowrank(weight, shared, linear.rank, svd, generator=generator, with_error=True)
            dtype = module.weight.dtype
            block.set_submodule(linear.name, EmulatorLinear.from_factors(u.to(dtype), v.to(dtype), module.bias))
            reports[linear.name] = {"rank": linear.rank, "form": linear.form, "error": error}
    return reports


def check_finite(covariances: dict[str, Tensor], outputs_ok: Tensor | None, block_name: str) -> None:
    """Raise naming the block and module whose calibration activations hold NaN or Inf (one sync per
    covariance, after the block's pass)."""
    for key, cov in covariances.items():
        if cov.device.type != "meta" and not bool(torch.isfinite(cov).all()):
            kind, name = key.split(":", 1)
            where = "input" if kind == "in" else "output"
            raise BuildError(f"{block_name}.{name}: calibration {where} activations contain NaN or Inf")
    if outputs_ok is not None and outputs_ok.device.type != "meta" and not bool(outputs_ok):
        raise BuildError(f"{block_name}: block output contains NaN or Inf")


def emulate_block(block: nn.Module, plan: list[list[LinearPlan]]) -> nn.Module:
    """Swap the planned linears of ``block`` for empty :class:`EmulatorLinear` (meta) of the planned rank,
    ready to receive saved factors."""
    for group in plan:
        for linear in group:
            module = block.get_submodule(linear.name)
            block.set_submodule(linear.name, EmulatorLinear(
                linear.in_features, linear.out_features, linear.rank, bias=module.bias is not None,
                device="meta", dtype=module.weight.dtype))
    return block


def _trace(matrix: Tensor) -> float:
    return float(torch.diagonal(matrix).sum())


def _damp(cov: Tensor, damping: float) -> None:
    """``cov += damping * (tr cov / n) I`` in place (one host sync for the trace, none on meta)."""
    if cov.device.type != "meta":
        torch.diagonal(cov).add_(damping * _trace(cov) / cov.shape[0])


def _damp_output(out_cov: Tensor, weight: Tensor, damping: float) -> None:
    """``out_cov += damping * (tr out_cov / tr W W^T) W W^T`` in place: the output-space form of :func:`_damp`."""
    gram = weight @ weight.T
    out_cov.add_(gram, alpha=damping * _trace(out_cov) / _trace(gram) if out_cov.device.type != "meta" else damping)


def _reads_input_covariance(linear: LinearPlan, shared: Whitening | None) -> bool:
    """Whether factoring ``linear`` still needs its group's input covariance: for ``W C W^T`` (a square
    linear), or for the group's whitening if it is not computed yet."""
    return linear.form == "input" and (linear.out_features <= linear.in_features or shared is None)


def _generator(seed: int, device: torch.device) -> torch.Generator | None:
    if device.type == "meta":
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator

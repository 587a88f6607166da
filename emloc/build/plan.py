"""Rank planning: which linears of each decoder block are compressed, to which rank, by which route.

A compression is one ratio for every linear of the decoder blocks or ``{regex: ratio}`` over full module
names; :func:`plan_compression` turns it into one :class:`LinearPlan` per compressed linear, grouped by the
input the linears share (one covariance per group).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .. import models
from ..errors import BuildError, check_ratio
from ..healing import HealConfig, heal_rank
from ..ranks import compressed_rank

__all__ = ["Compression", "LinearPlan", "covariance_keys", "plan_compression", "stack_compression"]

Compression = float | dict[str, float]


@dataclass(frozen=True)
class LinearPlan:
    """How one linear of a block is compressed: ``rank`` of its activation-aware factors, the exact route taken
    (docs/design.md §1.3 / §1.4): ``"output"`` (output covariance, ``out < in``) or ``"input"`` (whitened
    SVD), and ``heal_rank``, how many of those directions healing retrains (:mod:`emloc.healing`)."""

    name: str
    out_features: int
    in_features: int
    rank: int
    heal_rank: int = 0

    @property
    def form(self) -> str:
        return "output" if self.out_features < self.in_features else "input"


def covariance_keys(group: list[LinearPlan]) -> list[tuple[str, int]]:
    """The covariances one input group needs, as ``(key, size)``: ``"in:<first linear>"`` shared by the
    group's linears on the whitened route, ``"out:<linear>"`` for each linear on the output route."""
    keys = [(f"in:{group[0].name}", group[0].in_features)] if any(p.form == "input" for p in group) else []
    return keys + [(f"out:{p.name}", p.out_features) for p in group if p.form == "output"]


def _check_ratio(ratio, what: str) -> float:
    return check_ratio(ratio, what, BuildError)


def _compile(pattern) -> re.Pattern:
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as exc:
        raise BuildError(f"compression: pattern {pattern!r} is not a valid regular expression ({exc})") from exc


def _rules(compression: Compression) -> list[tuple[re.Pattern, float]]:
    """``compression`` as ``(pattern, ratio)`` rules, in the order they are tried."""
    if not isinstance(compression, dict):
        return [(re.compile(".*"), _check_ratio(compression, "compression"))]
    if not compression:
        raise BuildError("compression: the pattern dict is empty")
    return [(_compile(pattern), _check_ratio(ratio, f"compression pattern {pattern!r}"))
            for pattern, ratio in compression.items()]


def stack_compression(model: nn.Module, compression: Compression, vision: float | None = None) -> Compression:
    """``compression`` as the build applies it. A text model's is as given. For a vision-language model one
    ratio is the decoder blocks', and ``vision`` the vision tower blocks' (None: the tower stays dense), both
    as patterns over full names; a pattern dict covers every stack itself."""
    tower = models.vision_stack(model)
    if tower is None or isinstance(compression, dict):
        if vision is not None:
            raise BuildError("vision_compression: " + ("the model has no vision tower" if tower is None else
                             "with a pattern dict, give the vision tower's ratio as a pattern in it"))
        return compression
    rules = {re.escape(models.block_stack(model)[0]) + r"\..*": _check_ratio(compression, "compression")}
    if vision is not None:
        rules[re.escape(tower[0]) + r"\..*"] = _check_ratio(vision, "vision_compression")
    return rules


def plan_compression(model: nn.Module, compression: Compression,
                     heal: HealConfig | None = None) -> list[list[list[LinearPlan]]]:
    """Per block of every stack in build order (:func:`emloc.models.block_stacks`: a vision tower's, then
    the decoder's), the input groups of its compressed linears (names local to the block).

    ``compression`` is one ratio for every linear of the blocks, or ``{regex: ratio}`` matched
    (``re.fullmatch``) against full module names, first match wins. Linears whose rank would not save
    parameters stay dense. With ``heal``, each rank budget is split into factors and a heal adapter
    (:func:`emloc.healing.heal_rank`). Raises :class:`BuildError` for a ratio outside (0, 1] or a pattern
    that matches no linear of the blocks.
    """
    rules = _rules(compression)
    used, plans = set(), []
    stacks = models.block_stacks(model)
    for prefix, stack in stacks:
        for index, block in enumerate(stack):
            groups = []
            for group in models.input_groups(block):
                members = []
                for local in group:
                    full = f"{prefix}.{index}.{local}"
                    pattern, ratio = next(((p, r) for p, r in rules if p.fullmatch(full)), (None, None))
                    if pattern is not None:
                        used.add(pattern.pattern)
                    linear = block.get_submodule(local)
                    rank = None if ratio is None else compressed_rank(ratio, linear.out_features, linear.in_features)
                    if rank is not None:
                        members.append(LinearPlan(local, linear.out_features, linear.in_features, rank,
                                                  heal_rank(heal, rank)))
                if members:
                    groups.append(members)
            plans.append(groups)
    unused = [pattern for pattern, _ in rules if pattern.pattern not in used]
    if unused:
        prefix, stack = stacks[-1]
        raise BuildError(f"compression: pattern {unused[0].pattern!r} matches no linear of the blocks "
                         f"(names look like {prefix}.0.{models.input_groups(stack[0])[0][0]})")
    return plans

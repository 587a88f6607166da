"""The options several ``emloc`` sub-commands take, each defined once: one name, one set of values, one help.

Number options are checked by the types below, so ``--samples 0`` is refused rather than taken for a default.
"""
from __future__ import annotations

import argparse
import math

DTYPES = ("float32", "float16", "bfloat16")


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise argparse.ArgumentTypeError(f"must be an integer of at least {minimum}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    return _integer(text, 1)


def natural_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    return _integer(text, 0)


def non_negative_float(text: str) -> float:
    """argparse type: a finite number of at least 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of at least 0, got {text!r}")
    return value


def torch_dtype(text: str):
    """argparse type: one of :data:`DTYPES`, as the torch dtype it names."""
    import torch

    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(DTYPES)}, got {text!r}")
    return getattr(torch, text)


def add_dtype_argument(parser) -> None:
    """``--dtype``: the torch dtype (``args.dtype``) the model's weights are loaded and computed in, None for
    the stored one."""
    parser.add_argument("--dtype", type=torch_dtype, default=None, metavar="{" + ",".join(DTYPES) + "}",
                        help="dtype of the weights and the computation (default: as stored)")


def add_svd_argument(parser) -> None:
    """``--svd``: the factorisation of each compressed linear, one of ``emloc_kernels.lowrank.METHODS``."""
    from emloc_kernels.lowrank import METHODS

    parser.add_argument("--svd", choices=METHODS, default="exact",
                        help="factorisation of each compressed linear: exact, or a randomized range finder "
                             "(default exact)")


def add_batch_argument(parser, help: str, default: int | None = None) -> None:
    """``--batch``: the examples of one batch; ``help`` tells which (training micro-batch or calibration)."""
    parser.add_argument("--batch", type=positive_int, default=default, help=help)


def add_lora_rank_argument(parser, help: str = "LoRA rank on every linear but the LM head") -> None:
    """``--lora-r``: the LoRA rank trained, or planned for (default :data:`emloc.ranks.LORA_RANK`)."""
    from ..ranks import LORA_RANK

    parser.add_argument("--lora-r", type=positive_int, default=LORA_RANK, help=f"{help} (default %(default)s)")


def add_refreshes_argument(parser) -> None:
    """``--refreshes``: times training refreshes the emulator (:class:`emloc.training.TrainConfig` ``refreshes``),
    or that the memory plan plans for."""
    from ..training.config import REFRESHES

    parser.add_argument("--refreshes", type=natural_int, default=REFRESHES,
                        help="times the emulator's factors are recomputed from the original model with the LoRA "
                             "so far, evenly spaced (docs/design.md §1.9; each streams the original once, as the "
                             "build does; 0: off; default %(default)s)")


def add_samples_argument(parser) -> None:
    """``--samples``: the calibration samples of the build."""
    parser.add_argument("--samples", type=positive_int, default=64, help="calibration samples (default 64)")


def add_device_argument(parser) -> None:
    """``--device``: where the model is built or trained."""
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")


def add_clamp_argument(parser) -> None:
    """``--clamp``: the paper correction's cap; 0 turns it off, as 0 turns off ``--max-grad-norm``."""
    parser.add_argument("--clamp", type=non_negative_float, default=3.0,
                        help="cap on each LoRA direction's correction, as a multiple of that direction's "
                             "mean |B~| (docs/design.md §1.10; default 3.0; 0: off, the full correction)")


def clamp(args: argparse.Namespace) -> float | None:
    """The clamp the parsed ``--clamp`` describes: None where it is off."""
    return args.clamp or None


def add_heal_arguments(parser: argparse.ArgumentParser) -> None:
    """The healing options shared by ``emloc build`` and ``emloc run`` (off by default; rank from
    :class:`HealConfig`)."""
    from ..healing import HealConfig

    d = HealConfig()
    group = parser.add_argument_group("healing (docs/design.md §1.7)")
    group.add_argument("--heal-steps", type=natural_int, default=0,
                       help=f"distillation steps healing the emulator before training (default 0: off; {d.steps} "
                            "is the tested setting)")
    group.add_argument("--heal-rank", type=positive_int, default=d.rank,
                       help="heal adapter rank per compressed linear, taken from its rank budget (default %(default)s)")
    group.add_argument("--damping", type=float, default=0.0,
                       help="factor against C + damping tr(C)/n I (default 0: the activation-aware optimum)")


def heal_config(args: argparse.Namespace):
    """The :class:`HealConfig` the parsed healing options describe, or None with ``--heal-steps 0``."""
    from ..healing import HealConfig

    return HealConfig(rank=args.heal_rank, steps=args.heal_steps) if args.heal_steps else None


def add_vision_ratio_argument(parser) -> None:
    parser.add_argument("--vision-ratio", type=float, default=None, metavar="R",
                        help="a vision-language model's ratio for its vision tower's blocks (default: kept dense; "
                             "--ratio is its language model's)")

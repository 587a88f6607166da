"""Build the emulator layer by layer from a safetensors checkpoint, save it, resume it, load it.

The build (docs/design.md §1.1-1.6, §2.1, §5.1) never materialises the whole model:

1. the model skeleton lives on the meta device; the embedding is loaded to catch each block's inputs and
   keyword arguments for every calibration batch (:func:`emloc.models.capture_block_inputs`);
2. block by block: its weights are read from the shards, the calibration batches run through it while
   forward hooks accumulate one covariance per input group (the output covariance for linears with
   ``out < in``), the targeted linears are replaced by :class:`~emloc.EmulatorLinear` factors, the block is
   written to its own shard (atomically, recorded in a manifest) and released back to meta;
3. the index, the config with its ``emloc`` section, the tokenizer and a JSON report close the directory.

Modules, in the order they build on each other: ``plan`` (ranks per linear), ``block`` (the per-block
steps), ``activations`` (the host-side store between blocks), ``source`` (the streamed checkpoint),
``directory`` (file names, writes, the manifest), ``finish`` (the closing files), ``load`` (reading a
directory back), ``heal`` (the healing step), ``settings`` (arguments and recorded settings) and
``builder`` (:func:`build_emulator`).
"""
from ..errors import BuildError
from .block import BlockInput, calibrate_block, check_finite, compress_block, emulate_block, run_block
from .builder import build_emulator
from .directory import REPORT
from .load import load_emulator, read_emloc_section
from .plan import Compression, LinearPlan, plan_compression
from .source import blockwise_logits

__all__ = [
    "REPORT",
    "BlockInput",
    "BuildError",
    "Compression",
    "LinearPlan",
    "blockwise_logits",
    "build_emulator",
    "calibrate_block",
    "check_finite",
    "compress_block",
    "emulate_block",
    "load_emulator",
    "plan_compression",
    "read_emloc_section",
    "run_block",
]

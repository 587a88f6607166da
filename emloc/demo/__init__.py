"""The built-in demo: tiny decoders pretrained on the Python standard library and a downstream task.

* :mod:`.corpus` - the pretraining text: the standard library's own sources, present on every machine.
* :mod:`.tokenizer` - a byte-level BPE tokenizer trained on that text.
* :mod:`.configs` - the default model and the smaller baselines (same recipe, fewer parameters).
* :mod:`.pretrain` - ``python -m emloc.demo.pretrain`` rebuilds the shipped checkpoints from a seed.
* :mod:`.task` - the downstream task (generated from a seed, held-out test split, exact-match score).
* :mod:`.compare` - the comparison behind ``emloc demo`` and ``benchmarks/quality``.
* :mod:`.measure` - peak memory of one fine-tuning step, counted the same way for every row.
* :mod:`.report` - the results as a Markdown table and a PNG bar chart.
* :mod:`.diagnose` - how closely each adapter on the original model reproduces the fine-tuned emulator.
"""

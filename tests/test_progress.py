"""emloc.progress: one line per finished task where standard error is not a terminal, nothing when disabled,
a tqdm bar on a terminal."""
import io
import re

import pytest
from tqdm import tqdm

from emloc.progress import LineProgress, progress, track


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_one_line_per_task_however_many_steps():
    stream = io.StringIO()
    for block in range(3):
        with progress(16, f"block {block + 1}/3", "batch", stream=stream) as bar:
            for _ in range(16):
                bar.update()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3, lines
    for block, line in enumerate(lines):
        assert re.fullmatch(rf"block {block + 1}/3: 16 batches in \d+\.\d s", line), line


def test_close_writes_the_line_once():
    stream = io.StringIO()
    bar = progress(2, "merging LoRA", "shard", stream=stream)
    bar.update(2)
    bar.close()
    bar.close()
    assert re.fullmatch(r"merging LoRA: 2 shards in \d+\.\d s\n", stream.getvalue()), stream.getvalue()


def test_the_line_tells_an_unfinished_task_a_resumed_one_and_the_last_postfix():
    stream = io.StringIO()
    with progress(100, "training LoRA", "step", initial=40, stream=stream) as bar:
        bar.update(30)
        bar.set_postfix(loss="2.000")
        bar.set_postfix(loss="1.234")
    assert re.fullmatch(r"training LoRA: 30/60 steps in \d+\.\d s \(resumed at 40, loss=1\.234\)\n",
                        stream.getvalue()), stream.getvalue()


def test_track_yields_every_item_and_writes_one_line():
    stream = io.StringIO()
    assert list(track(["a", "b", "c"], "correcting LoRA", "layer", stream=stream)) == ["a", "b", "c"]
    assert re.fullmatch(r"correcting LoRA: 3 layers in \d+\.\d s\n", stream.getvalue()), stream.getvalue()


def test_write_is_a_line_of_its_own_before_the_summary():
    stream = io.StringIO()
    with progress(1, "training LoRA", "step", stream=stream) as bar:
        bar.write("step 1: {}")
        bar.update()
    assert stream.getvalue().splitlines()[0] == "step 1: {}"
    assert len(stream.getvalue().splitlines()) == 2


def test_an_interrupted_task_writes_no_summary():
    stream = io.StringIO()
    with pytest.raises(ValueError), progress(4, "block 1/2", "batch", stream=stream) as bar:
        bar.update()
        raise ValueError("bad batch")
    assert stream.getvalue() == ""


@pytest.mark.parametrize("stream", (io.StringIO(), Terminal()), ids=("log", "terminal"))
def test_a_disabled_task_writes_nothing(stream):
    with progress(3, "healing the emulator", "step", enabled=False, stream=stream) as bar:
        bar.update(3)
        bar.set_postfix(loss="1.0")
        bar.write("not shown")
    assert list(track(range(3), "healing the emulator", "step", enabled=False, stream=stream)) == [0, 1, 2]
    assert stream.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar():
    stream = Terminal()
    bar = progress(5, "merging LoRA", "shard", stream=stream)
    try:
        assert isinstance(bar, tqdm) and bar.total == 5
    finally:
        bar.close()
    assert isinstance(progress(5, "merging LoRA", "shard", stream=io.StringIO()), LineProgress)

"""The ``emloc`` command line: the options several sub-commands share take one name and one set of values
everywhere, and every user error, a bad option included, is one line and one exit status."""
import pytest
import torch

from emloc import cli
from emloc.commands.options import clamp
from emloc_kernels.lowrank import METHODS
from utils import cli_error

# The positional arguments and required options of each sub-command, enough to parse its other options.
REQUIRED = {
    "build": ["model", "--data", "d.jsonl", "--out", "out"],
    "plan": ["Qwen2.5-7B"],
    "train": ["emulator", "--data", "d.jsonl", "--out", "out"],
    "correct": ["model", "emulator", "adapter", "--out", "out"],
    "run": ["model", "--data", "d.jsonl", "--out", "out"],
}


def parse(command: str, *options: str):
    return cli.build_parser().parse_args([command, *REQUIRED[command], *options])


@pytest.mark.parametrize("command", ["build", "train", "run"])
@pytest.mark.parametrize("name, dtype", [("float32", torch.float32), ("float16", torch.float16),
                                         ("bfloat16", torch.bfloat16)])
def test_dtype_names_are_the_same_everywhere(command, name, dtype):
    assert parse(command, "--dtype", name).dtype is dtype
    assert parse(command).dtype is None


@pytest.mark.parametrize("command", ["build", "train", "run"])
def test_a_dtype_outside_the_table_is_refused(capsys, command):
    line = cli_error(capsys, [command, *REQUIRED[command], "--dtype", "bf16"])
    assert line.startswith(f"emloc {command}: argument --dtype: must be one of float32, float16, bfloat16, "
                           "got 'bf16'")


@pytest.mark.parametrize("command", ["build", "plan", "run"])
def test_svd_offers_every_factorisation(command, capsys):
    assert parse(command).svd == "exact"
    for method in METHODS:
        assert parse(command, "--svd", method).svd == method
    assert "invalid choice: 'svd'" in cli_error(capsys, [command, *REQUIRED[command], "--svd", "svd"])


@pytest.mark.parametrize("command, default", [("build", None), ("plan", 1), ("train", 2), ("run", 2)])
def test_batch_is_one_option_everywhere(command, default):
    assert parse(command).batch == default
    assert parse(command, "--batch", "3").batch == 3


@pytest.mark.parametrize("command", ["correct", "run"])
def test_clamp_zero_turns_the_clamp_off(command):
    assert clamp(parse(command)) == 3.0
    assert clamp(parse(command, "--clamp", "1.5")) == 1.5
    assert clamp(parse(command, "--clamp", "0")) is None


@pytest.mark.parametrize("command", ["correct", "run"])
@pytest.mark.parametrize("value", ["-1", "nan", "inf", "x"])
def test_a_clamp_out_of_range_is_refused(capsys, command, value):
    line = cli_error(capsys, [command, *REQUIRED[command], "--clamp", value])
    assert line.startswith(f"emloc {command}: argument --clamp: must be a finite number of at least 0, got '{value}'")


@pytest.mark.parametrize("command, option", [("build", "--batch-size"), ("plan", "--method"),
                                             ("correct", "--no-clamp")])
def test_an_unknown_option_is_named_for_its_sub_command(capsys, command, option):
    line = cli_error(capsys, [command, *REQUIRED[command], option])
    assert line == f"emloc {command}: unrecognized arguments: {option} (see emloc {command} --help)"


def test_a_missing_command_is_one_line(capsys):
    capsys.readouterr()
    assert cli.main([]) == 2
    assert capsys.readouterr().err == "emloc: the following arguments are required: COMMAND (see emloc --help)\n"

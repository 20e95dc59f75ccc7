"""CLI flags derived from a stage kind's params model: one declaration gives the recipe key, the
flag, its type, choices, default and help, and the parsed flags are validated by the same model."""

from __future__ import annotations

import argparse
from typing import Literal

import pytest
from pydantic import Field

from chla_launcher.cli import build_parser, main
from chla_launcher.commands import pretokenize as pretokenize_command
from chla_launcher.contract.errors import ChlaError
from chla_launcher.contract.kinds.pretokenize import PretokenizeParams
from chla_launcher.flags import Flag, ParamFlags


class WithNewOption(PretokenizeParams):
    """A pretokenize kind with one more option, declared once, here."""

    dedup: Literal["none", "exact", "near"] = Field("exact", description="drop repeated documents")
    min_chars: int = Field(5, ge=0, description="skip shorter documents")


def _parser(flags: ParamFlags) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="x")
    flags.add_to(parser)
    return parser


def test_a_new_params_field_becomes_a_flag_with_its_type_default_and_help():
    # the command's own renames, nothing about the new fields: they come from the model alone
    flags = ParamFlags(WithNewOption, pretokenize_command.FLAGS.flags)
    parser = _parser(flags)
    args = parser.parse_args(["--tokenizer", "t", "--input", "a.txt", "b.txt", "--min-chars", "7"])
    params = flags.params(args)
    assert (params.dedup, params.min_chars, params.inputs) == ("exact", 7, ["a.txt", "b.txt"])
    assert params.append_eos is True and params.piece_mb == 16  # the model's own defaults
    help_text = parser.format_help()
    assert "--dedup {none,exact,near}" in help_text and "drop repeated documents (default: exact)" in help_text
    # control: the kind's own model has no such field, so its parser has no such flag
    with pytest.raises(SystemExit):
        _parser(pretokenize_command.FLAGS).parse_args(["--tokenizer", "t", "--input", "a", "--min-chars", "7"])


def test_renamed_and_negated_flags_map_back_to_their_fields():
    args = _parser(pretokenize_command.FLAGS).parse_args(
        ["--tokenizer", "t", "--input", "a", "--input", "b", "--no-eos", "--bos", "--format", "jsonl"]
    )
    params = pretokenize_command.FLAGS.params(args)
    assert params.inputs == ["a", "b"] and params.text_format == "jsonl"
    assert params.append_eos is False and params.prepend_bos is True


def test_a_value_the_model_refuses_is_one_error_naming_the_flag(capsys):
    flags = ParamFlags(PretokenizeParams, (Flag("inputs", name="--input"),))
    args = _parser(flags).parse_args(["--tokenizer", "t", "--input", "a", "--workers", "0"])
    with pytest.raises(ChlaError, match=r"^--workers: Input should be greater than or equal to 1$"):
        flags.params(args)
    code = main(["pretokenize", "--tokenizer", "t", "--input", "a", "--out", "o", "--piece-mb", "-1"])
    assert code == 2 and capsys.readouterr().err.strip() == "chla: --piece-mb: Input should be greater than 0"


def test_a_positional_field_is_an_argument_without_a_flag():
    from chla_launcher.commands import export as export_command

    parser = _parser(export_command.FLAGS)
    params = export_command.FLAGS.params(parser.parse_args(["models/m", "--outtype", "q8_0"]))
    assert (params.model, params.outtype) == ("models/m", "q8_0")
    assert export_command.FLAGS.params(parser.parse_args(["models/m"])).outtype == "f16"  # the model's default
    assert "MODEL_DIR" in parser.format_usage() and "--model" not in parser.format_help()
    with pytest.raises(SystemExit):  # control: the argument is required
        parser.parse_args(["--outtype", "f16"])
    with pytest.raises(TypeError, match="positional"):  # only a required str can be positional
        _parser(ParamFlags(PretokenizeParams, (Flag("workers", positional=True),)))


def test_a_misnamed_or_unsupported_field_is_a_programming_error():
    with pytest.raises(TypeError, match="no field"):
        ParamFlags(PretokenizeParams, (Flag("input"),)).offered()
    from chla_launcher.contract.kinds.evaluate import EvaluateParams

    with pytest.raises(TypeError, match="lm_eval"):  # a nested model is not a flag: the command excludes it
        _parser(ParamFlags(EvaluateParams))


def test_every_command_built_from_params_parses_its_help():
    parser = build_parser()
    for argv in (
        ["pretokenize", "--help"],
        ["merge", "--help"],
        ["eval", "--help"],
        ["vocab", "train", "--help"],
        ["vocab", "merge", "--help"],
        ["export", "gguf", "--help"],
        ["import", "gguf", "--help"],
        ["assets", "fetch", "--help"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 0

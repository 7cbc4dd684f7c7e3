"""Every command line flag explains itself, shows its default once, and is in docs/usage.md."""

from __future__ import annotations

import argparse
import re
import runpy
from pathlib import Path

import pytest

from gqa_prune.cli_utils import HelpFormatter, UserErrorParser

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = runpy.run_path(str(ROOT / "scripts" / "flag_reference.py"))
COMMANDS = REFERENCE["parsers"]()


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def test_the_reference_covers_every_sub_command():
    from gqa_prune.cli import SUBCOMMANDS

    names = {n for n, _ in COMMANDS}
    missing = [s for s in SUBCOMMANDS if f"gqa-prune {s}" not in names]
    assert not missing, f"scripts/flag_reference.py lacks the parsers of {missing}"


@pytest.mark.parametrize("name,build", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_every_flag_has_help(name, build):
    missing = [a.option_strings or a.dest for a in _options(build()) if not (a.help or "").strip()]
    assert not missing, f"{name}: flags without help: {missing}"


@pytest.mark.parametrize("name,build", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_help_shows_each_default_once_and_never_none(name, build):
    parser = build()
    text = parser.format_help()
    assert "(default: None)" not in text
    assert "(default: False)" not in text
    for action in _options(parser):
        shown = HelpFormatter(name)._get_help_string(action) or ""
        assert shown.count("(default:") <= 1, (action.option_strings, shown)
        if action.option_strings and action.default not in (None, False):
            # a valued flag with a default names it, by the formatter or in its own words
            assert "default" in shown, (action.option_strings, shown)


def test_formatter_leaves_help_that_names_its_default():
    p = UserErrorParser(prog="x")
    p.add_argument("--a", default=3, help="apples")
    p.add_argument("--b", default="s", help="s (default) or t")
    p.add_argument("--c", default=None, help="unset = all")
    p.add_argument("--d", action="store_true", help="a switch")
    text = " ".join(p.format_help().split())
    assert "apples (default: 3)" in text
    assert "s (default) or t --c" in text  # nothing appended to --b
    assert "unset = all --d" in text  # nor to a None default
    assert text.rstrip().endswith("a switch")  # nor to a switch


def test_base_model_help_names_every_builtin_model():
    from gqa_prune.models.loading import BUILTIN_MODELS

    for name, build in COMMANDS:
        for action in _options(build()):
            if "--base_model" in action.option_strings:
                assert all(m in action.help for m in BUILTIN_MODELS), (name, action.help)


def test_usage_page_holds_the_current_flag_reference():
    page = (ROOT / "docs" / "usage.md").read_text()
    assert REFERENCE["current_page_section"](page) == REFERENCE["reference"](), (
        "docs/usage.md is behind the code: run python scripts/flag_reference.py --write"
    )


def test_reference_lists_every_flag_with_its_default():
    sections = re.split(r"^### `([^`]+)`$", REFERENCE["reference"](), flags=re.M)
    by_command = dict(zip(sections[1::2], sections[2::2]))
    assert sorted(by_command) == sorted(n for n, _ in COMMANDS)
    for name, build in COMMANDS:
        rows = dict(re.findall(r"^\| (`[^|]+`) \| ([^|]+) \|", by_command[name], re.M))
        for action in _options(build()):
            key = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}`"
            assert key in rows, (name, key)
            if action.option_strings and action.default not in (None, False):
                assert rows[key].strip() == f"`{action.default}`", (name, key, rows[key])

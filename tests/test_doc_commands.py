"""The ``bench/bench_quality.py`` commands quoted in the README and docs/ run as written.

Every such line in a ```bash block is expanded with the shell variables the block sets
(``S=...``), parsed by the bench's own command line, and each method and ``--set`` override
is turned into the bench's RunConfig (which checks its values). Lines that elide arguments
with ``...`` are skipped.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_quality import base_config, build_parser, method_settings, parse_settings  # noqa: E402

ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(\S+)")
VARIABLE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


def logical_lines(text: str) -> list[tuple[int, str]]:
    """``(first line number, line)`` with backslash continuations joined."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if pending is not None:
            number, line = pending[0], pending[1] + " " + line.strip()
        pending = (number, line[:-1]) if line.endswith("\\") else None
        if pending is None:
            out.append((number, line))
    return out


def substitute(line: str, variables: dict[str, str]) -> str:
    """``$NAME`` replaced by its value where ``variables`` has one."""
    return VARIABLE.sub(lambda v: variables.get(v.group(1), v.group(0)), line)


def bench_commands(text: str) -> list[tuple[int, str]]:
    """``(line number, command)`` of each bench_quality.py line in the ```bash blocks of
    ``text``, with the block's ``NAME=value`` variables substituted."""
    found: list[tuple[int, str]] = []
    variables: dict[str, str] = {}
    in_block = False
    for number, line in logical_lines(text):
        if line.startswith("```"):
            in_block = line.startswith("```bash")
            variables = {}
            continue
        if not in_block:
            continue
        if (m := ASSIGNMENT.match(line)) and "bench_quality.py" not in line:
            variables[m.group(1)] = m.group(2)
        elif "bench/bench_quality.py" in line and "..." not in line:
            found.append((number, substitute(line, variables)))
    return found


def check_command(command: str) -> None:
    """Raises if the command's arguments, methods or overrides would be refused."""
    argv = shlex.split(command, comments=True)
    argv = argv[argv.index("bench/bench_quality.py") + 1 :]
    assert not any("$" in a for a in argv), f"undefined shell variable in {argv}"
    args = build_parser().parse_args(argv)
    extra = parse_settings(args.set)
    for spec in args.targets.split(","):
        base = base_config(spec, extra)
        for method in args.methods.split(","):
            replace(base, **method_settings(method))


DOCS = [
    ROOT / "README.md",
    ROOT / "bench" / "items" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]
COMMANDS = [
    pytest.param(command, id=f"{path.relative_to(ROOT)}:{number}")
    for path in DOCS
    for number, command in bench_commands(path.read_text())
]


def test_the_docs_quote_bench_commands():
    assert len(COMMANDS) >= 20  # the benchmark pages quote their commands


@pytest.mark.parametrize("command", COMMANDS)
def test_quoted_bench_command_parses(command):
    check_command(command)


def test_an_unknown_method_or_setting_is_caught():
    block = "```bash\nS=default@alpha=1\npython bench/bench_quality.py \\\n  --methods $S,S\n```\n"
    ((number, command),) = bench_commands(block)
    assert number == 3 and "--methods default@alpha=1,S" in command
    with pytest.raises(SystemExit, match="unknown method 'S'"):
        check_command(command)
    with pytest.raises(SystemExit, match="unknown RunConfig setting"):
        check_command("python bench/bench_quality.py --methods default --set no_such=1")
    with pytest.raises(AssertionError, match="undefined shell variable"):
        check_command("python bench/bench_quality.py --methods $T")

"""Write the flag reference of docs/usage.md from the command lines' own parsers.

``python scripts/flag_reference.py`` prints the reference; ``--write`` replaces the text
between the two markers in docs/usage.md. ``tests/test_cli_help.py`` checks that the page
holds what this prints, so a flag added, renamed or given a new default shows up as a failing
test until the page is written again.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from gqa_prune.cli_utils import is_switch

USAGE = Path(__file__).resolve().parents[1] / "docs" / "usage.md"
BEGIN = "<!-- flag reference: written by scripts/flag_reference.py -->"
END = "<!-- end of flag reference -->"


def parsers() -> list[tuple[str, Callable[[], argparse.ArgumentParser]]]:
    """Every command line of the package: its name and its parser builder."""
    from gqa_prune.cli import build_parser
    from gqa_prune.evaluation.cli import build_speed_parser
    from gqa_prune.export.cli import build_parser as build_export_parser
    from gqa_prune.recovery.cli import build_parser as build_finetune_parser
    from gqa_prune.search_cli import build_search_parser

    return [
        ("gqa-prune", build_parser),
        ("gqa-prune search", build_search_parser),
        ("gqa-prune bench-speed", build_speed_parser),
        ("gqa-prune export-gguf", build_export_parser),
        ("gqa-prune-finetune", build_finetune_parser),
    ]


def _default(action: argparse.Action) -> str:
    if action.required or not action.option_strings:
        return "required"
    if is_switch(action):
        return "off"
    if action.default is None:
        return "—"
    return f"`{action.default}`"


def _cell(text: str) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text.replace("<", "&lt;").replace(">", "&gt;")  # not HTML tags in Markdown


def reference() -> str:
    """The Markdown tables: one per command and argument group (flag, default, meaning)."""
    out: list[str] = []
    for name, build in parsers():
        parser = build()
        out += [f"### `{name}`", "", _cell(parser.description or ""), ""]
        for group in parser._action_groups:
            actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
            if not actions:
                continue
            title = {"options": "options", "positional arguments": "arguments"}.get(
                group.title or "", group.title or ""
            )
            out += [f"**{title}**", "", "| flag | default | meaning |", "|---|---|---|"]
            for a in actions:
                flag = ", ".join(f"`{s}`" for s in a.option_strings) or f"`{a.dest}`"
                out.append(f"| {flag} | {_cell(_default(a))} | {_cell(a.help or '')} |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def current_page_section(page: str) -> str:
    """The text between the markers of ``page``."""
    if BEGIN not in page or END not in page:
        raise SystemExit(f"{USAGE} has no flag-reference markers ({BEGIN} ... {END})")
    return page.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def main(argv: list[str]) -> int:
    text = reference()
    if "--write" not in argv:
        print(text, end="")
        return 0
    page = USAGE.read_text()
    current_page_section(page)  # the markers must be there
    head, rest = page.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    USAGE.write_text(f"{head}{BEGIN}\n\n{text}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

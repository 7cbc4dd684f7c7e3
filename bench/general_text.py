"""Write a general-English calibration text: the novel *Botchan* (Natsume Soseki, English
translation, Project Gutenberg eBook #8868, public domain in the US), as shipped in the
source distribution of ``sentencepiece`` on PyPI (``test/botchan.txt``).

WikiText-2 is encyclopedia prose; calibrating on it alone fits the repair to one register.
This is about 50,000 words of narrative English and dialogue from a package registry (no hub
needed), with the Project Gutenberg header and licence footer removed. It is not part of any
evaluation set. Use it beside WikiText::

    python bench/general_text.py .cache/text/botchan.txt
    gqa-prune ... --calibration_dataset wikitext2,.cache/text/botchan.txt

The output is written to a temporary file and renamed; an existing file is kept unless
``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

PACKAGE = "sentencepiece==0.2.3"
MEMBER = "sentencepiece-0.2.3/test/botchan.txt"
START = "*** START OF THIS PROJECT GUTENBERG EBOOK"
END = "End of Project Gutenberg's"


def body(text: str) -> str:
    """The book between the Project Gutenberg header and footer (LF line ends, no BOM)."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(START)) + 1
    end = next(i for i, line in enumerate(lines) if line.startswith(END))
    return "\n".join(lines[start:end]).strip() + "\n"


def fetch_book() -> str:
    """Download the sdist with pip (no build) and read the book out of it."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps"]
        subprocess.run([*cmd, "--no-binary", ":all:", PACKAGE, "-d", tmp], check=True)
        (sdist,) = Path(tmp).glob("sentencepiece-*.tar.gz")
        with tarfile.open(sdist) as tar:
            member = tar.extractfile(MEMBER)
            if member is None:
                raise SystemExit(f"{MEMBER} not found in {sdist.name}")
            return member.read().decode("utf-8")


def write_text_cli(doc: str, produce: Callable[[], str]) -> None:
    """Parse ``output [--overwrite]`` and write ``produce()`` there (temporary file, renamed).

    An existing output is kept unless ``--overwrite``; the word count is printed.
    """
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("output", type=Path, help="text file to write")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    if args.output.exists() and not args.overwrite:
        raise SystemExit(f"{args.output} exists; pass --overwrite to replace it")
    text = produce()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, args.output)
    print(f"{args.output}: {len(text.split()):,} words")


def main() -> None:
    write_text_cli(__doc__, lambda: body(fetch_book()))


if __name__ == "__main__":
    main()

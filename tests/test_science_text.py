"""bench/science_text.py keeps each distinct non-empty SciQ support paragraph, in order."""

import sys
from pathlib import Path

from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from science_text import passages  # noqa: E402


def test_passages_skip_empty_and_repeated_paragraphs(tmp_path):
    rows = {
        "question": ["q1", "q2", "q3", "q4", "q5"],
        "support": ["  Plants make sugar.\n", "", "Ice floats.", "Plants make sugar.", "   "],
    }
    Dataset.from_dict(rows).save_to_disk(str(tmp_path / "sciq"))
    (arrow,) = (tmp_path / "sciq").glob("*.arrow")
    assert passages(arrow) == ["Plants make sugar.", "Ice floats."]

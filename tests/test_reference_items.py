"""The reference per-item results in bench/items/ load and pair with each other.

Each folder's files must be comparable item by item with bench/compare_items.py (same tasks,
same items), and each file's stored task means must agree with its per-item scores.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gqa_prune.evaluation.paired import paired_difference

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
from compare_items import load  # noqa: E402

ITEMS = BENCH / "items"
FOLDERS = sorted(p for p in ITEMS.iterdir() if p.is_dir())


def test_both_folders_hold_results():
    assert [p.name for p in FOLDERS] == ["test", "validation"]
    for folder in FOLDERS:
        assert len(list(folder.glob("*.json"))) >= 2, folder


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_results_in_a_folder_pair_item_by_item(folder):
    files = sorted(folder.glob("*.json"))
    first = load(str(files[0]))
    for path in files[1:]:
        per_task, mean = paired_difference(load(str(path)), first)  # raises on other items
        assert set(per_task) == set(first.requested), path.name
        assert mean.n == sum(len(first.items[t]["score"]) for t in first.requested)


@pytest.mark.parametrize(
    "path", sorted(ITEMS.glob("*/*.json")), ids=lambda p: f"{p.parent.name}/{p.name}"
)
def test_stored_means_match_the_items(path):
    result = load(str(path))
    means = [
        sum(result.items[t]["score"]) / len(result.items[t]["score"]) for t in result.requested
    ]
    assert result.mean_score == pytest.approx(sum(means) / len(means), abs=1e-9)

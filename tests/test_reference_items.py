"""The reference per-item results in bench/items/ load and pair with each other.

Each folder's files must be comparable item by item with bench/compare_items.py (same tasks,
same items), and each file's stored task means must agree with its per-item scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gqa_prune.evaluation.paired import paired_difference
from gqa_prune.evaluation.zeroshot import ZeroShotResult

ITEMS = Path(__file__).resolve().parents[1] / "bench" / "items"
FOLDERS = sorted(p for p in ITEMS.iterdir() if p.is_dir())


def load(path: Path) -> ZeroShotResult:
    return ZeroShotResult.from_dict(json.loads(path.read_text()))


def test_both_folders_hold_results():
    assert [p.name for p in FOLDERS] == ["test", "validation"]
    for folder in FOLDERS:
        assert len(list(folder.glob("*.json"))) >= 2, folder


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_results_in_a_folder_pair_item_by_item(folder):
    files = sorted(folder.glob("*.json"))
    first = load(files[0])
    for path in files[1:]:
        per_task, mean = paired_difference(load(path), first)  # raises on other items
        assert set(per_task) == set(first.requested), path.name
        assert mean.n == sum(len(first.items[t]["score"]) for t in first.requested)


@pytest.mark.parametrize(
    "path", sorted(ITEMS.glob("*/*.json")), ids=lambda p: f"{p.parent.name}/{p.name}"
)
def test_stored_means_match_the_items(path):
    result = load(path)
    means = [
        sum(result.items[t]["score"]) / len(result.items[t]["score"]) for t in result.requested
    ]
    assert result.mean_score == pytest.approx(sum(means) / len(means), abs=1e-9)

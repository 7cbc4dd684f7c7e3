"""The reference per-item results in bench/items/ load and pair with each other.

Within a folder, the files of one model and target must be comparable item by item with
bench/compare_items.py (same tasks, same items), and each file's stored task means must agree
with its per-item scores.
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


def test_every_folder_holds_results():
    assert [p.name for p in FOLDERS] == ["test", "test-all", "test-seeds", "validation"]
    for folder in FOLDERS:
        assert len(list(folder.glob("*.json"))) >= 2, folder


def groups() -> dict[str, list[Path]]:
    """The files of each folder by model and target (``folder/<name before __>``)."""
    found: dict[str, list[Path]] = {}
    for path in sorted(ITEMS.glob("*/*.json")):
        found.setdefault(f"{path.parent.name}/{path.name.split('__')[0]}", []).append(path)
    return found


GROUPS = groups()


@pytest.mark.parametrize("files", list(GROUPS.values()), ids=list(GROUPS))
def test_results_of_one_model_pair_item_by_item(files):
    assert len(files) >= 2, f"{files[0]}: a reference row with nothing to pair with"
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


@pytest.mark.parametrize("path", sorted((ITEMS / "test-all").glob("*.json")), ids=lambda p: p.name)
def test_all_items_start_with_the_first_500(path):
    """A run on every test item scores its first items as the 500-item run did (the
    pipeline and the evaluation are deterministic; log-probs move only with batching)."""
    short = ITEMS / "test" / path.name
    assert short.is_file(), f"{path.name}: no 500-item row to check it against"
    full, first = load(str(path)), load(str(short))
    for task in full.requested:
        mine, theirs = full.items[task], first.items[task]
        score = dict(zip(mine["doc_id"], mine["score"]))
        logprob = dict(zip(mine["doc_id"], mine["logprob"]))
        assert len(mine["doc_id"]) >= len(theirs["doc_id"]), task
        for doc, s, lp in zip(theirs["doc_id"], theirs["score"], theirs["logprob"]):
            assert score[doc] == s, (task, doc)
            assert logprob[doc] == pytest.approx(lp, abs=1e-3), (task, doc)

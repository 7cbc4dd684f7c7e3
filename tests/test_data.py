"""Text sources and the calibration sampler."""

import pytest
import torch

from gqa_prune.data import load_text, sample_calibration
from gqa_prune.errors import GQAPruneError


def test_local_named_source_resolves_by_split(tmp_path, monkeypatch):
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text("test split\r\n")
    (tmp_path / "wikitext-2" / "valid.txt").write_text("valid split\n")
    monkeypatch.setenv("GQA_PRUNE_DATA_DIR", str(tmp_path))
    assert load_text("wikitext2", "eval") == "test split\n"
    assert load_text("wikitext2", "calibration") == "valid split\n"


def test_missing_and_empty_sources_are_clear(tmp_path, monkeypatch):
    monkeypatch.delenv("GQA_PRUNE_DATA_DIR", raising=False)
    with pytest.raises(GQAPruneError, match="neither a file nor a known data set"):
        load_text(str(tmp_path / "nope.txt"), "eval")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(GQAPruneError, match="empty"):
        load_text(str(empty), "eval")
    with pytest.raises(GQAPruneError, match="not reachable|does not exist|no data directory"):
        load_text("wikitext2", "eval", data_dir=tmp_path)


def test_calibration_sampler_is_seeded_and_unpadded():
    tokens = torch.arange(1000)
    a = sample_calibration(tokens, 8, 32, seed=3)
    b = sample_calibration(tokens, 8, 32, seed=3)
    c = sample_calibration(tokens, 8, 32, seed=4)
    assert a.shape == (8, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # each sample is a run of consecutive tokens from the stream (no padding inserted)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 31, dtype=torch.long))
    with pytest.raises(GQAPruneError, match="fewer than seq_len"):
        sample_calibration(torch.arange(10), 2, 32, seed=0)

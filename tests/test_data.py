"""Text sources (data directory, packaged copy, files) and the calibration sampler."""

import hashlib
import lzma
import os
from importlib import resources
from pathlib import Path

import pytest
import torch

from gqa_prune.data import PACKAGED_FILES, load_text, sample_calibration, source_list
from gqa_prune.errors import GQAPruneError


def _write_local_copies(root, eval_text, calib_text):
    (root / "wikitext-2-raw").mkdir()
    (root / "wikitext-2").mkdir()
    (root / "wikitext-2-raw" / "wiki.test.raw").write_bytes(eval_text.encode())
    (root / "wikitext-2" / "valid.txt").write_bytes(calib_text.encode())


def test_local_named_source_resolves_by_split(tmp_path, monkeypatch):
    _write_local_copies(tmp_path, "test split\r\n", "valid split\n")
    monkeypatch.setenv("GQA_PRUNE_DATA_DIR", str(tmp_path))
    assert load_text("wikitext2", "eval") == "test split\n"
    assert load_text("wikitext2", "calibration") == "valid split\n"


def test_explicit_data_dir_wins_over_env_and_packaged_copy(tmp_path, monkeypatch):
    env_dir, arg_dir = tmp_path / "env", tmp_path / "arg"
    env_dir.mkdir()
    arg_dir.mkdir()
    _write_local_copies(env_dir, "from env\n", "env calib\n")
    _write_local_copies(arg_dir, "from argument\r\n", "argument calib\n")
    monkeypatch.setenv("GQA_PRUNE_DATA_DIR", str(env_dir))
    assert load_text("wikitext2", "eval", data_dir=arg_dir) == "from argument\n"
    assert load_text("wikitext2", "calibration", data_dir=str(arg_dir)) == "argument calib\n"
    assert load_text("wikitext2", "eval") == "from env\n"


# SHA-256 of the source files, from the data README (/work/shared/data/README.md)
SOURCE_SHA256 = {
    "eval": "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c",
    "calibration": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
}
SOURCE_FILES = {"eval": "wikitext-2-raw/wiki.test.raw", "calibration": "wikitext-2/valid.txt"}


@pytest.mark.parametrize("split", ["eval", "calibration"])
def test_packaged_copy_is_used_without_a_data_dir(split, monkeypatch):
    """With no data directory the shipped WikiText-2 is returned, read like a local file."""
    shared = os.environ.get("GQA_PRUNE_DATA_DIR")
    monkeypatch.delenv("GQA_PRUNE_DATA_DIR", raising=False)
    text = load_text("wikitext2", split)
    # the shipped bytes are the source file's bytes
    name, _ = PACKAGED_FILES["wikitext2"][split]
    raw = lzma.decompress((resources.files("gqa_prune") / "data_files" / name).read_bytes())
    assert hashlib.sha256(raw).hexdigest() == SOURCE_SHA256[split]
    assert text == raw.decode("utf-8").replace("\r\n", "\n")
    # and equal to what the local copy gives (same normalisation), where one is at hand
    source = Path(shared or "/nonexistent") / SOURCE_FILES[split]
    if source.is_file():
        assert text == source.read_bytes().decode("utf-8").replace("\r\n", "\n")
        assert text == load_text("wikitext2", split, data_dir=shared)


def test_damaged_packaged_copy_is_refused(tmp_path, monkeypatch):
    import gqa_prune.data as data

    bad = {"wikitext2": {"eval": (PACKAGED_FILES["wikitext2"]["eval"][0], "0" * 64)}}
    monkeypatch.setattr(data, "PACKAGED_FILES", bad)
    monkeypatch.delenv("GQA_PRUNE_DATA_DIR", raising=False)
    with pytest.raises(GQAPruneError, match="does not match its SHA-256"):
        load_text("wikitext2", "eval")


def test_package_data_holds_the_files_and_their_attribution():
    root = resources.files("gqa_prune") / "data_files"
    for split in ("eval", "calibration"):
        name, _ = PACKAGED_FILES["wikitext2"][split]
        assert (root / name).is_file()
    readme = (root / "README.md").read_text()
    assert "CC BY-SA 3.0" in readme and "Merity" in readme


def test_missing_and_empty_sources_are_clear(tmp_path, monkeypatch):
    monkeypatch.delenv("GQA_PRUNE_DATA_DIR", raising=False)
    with pytest.raises(GQAPruneError, match="neither a file nor a known data set"):
        load_text(str(tmp_path / "nope.txt"), "eval")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(GQAPruneError, match="empty"):
        load_text(str(empty), "eval")
    with pytest.raises(GQAPruneError, match="does not exist.*packaged copy"):
        load_text("wikitext2", "eval", data_dir=tmp_path)
    # no packaged copy of ptb: an unset data dir still ends in a clear error
    with pytest.raises(GQAPruneError, match="no data directory is set"):
        load_text("ptb", "eval")


def test_source_list_joins_named_sets_and_files_in_order(tmp_path, monkeypatch):
    _write_local_copies(tmp_path, "test split\n", "valid split\r\n")
    monkeypatch.setenv("GQA_PRUNE_DATA_DIR", str(tmp_path))
    book = tmp_path / "book.txt"
    book.write_text("Chapter one.\r\n")
    assert load_text(f"{book},wikitext2", "calibration") == "Chapter one.\n\n\nvalid split\n"
    assert load_text(f"wikitext2, {book}", "eval") == "test split\n\n\nChapter one.\n"
    # a file whose name holds a comma is one source, not a list
    odd = tmp_path / "a,b.txt"
    odd.write_text("odd name")
    assert source_list(str(odd)) == [str(odd)]
    assert load_text(str(odd), "calibration") == "odd name"
    with pytest.raises(GQAPruneError, match="empty entry"):
        load_text("wikitext2,", "calibration")
    with pytest.raises(GQAPruneError, match="neither a file nor a known data set"):
        load_text(f"wikitext2,{tmp_path / 'missing.txt'}", "calibration")


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

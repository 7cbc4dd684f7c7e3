"""WinoGrande scored by partial evaluation, as lm-eval's ``winogrande`` task does.

The sentence has one blank ``_``. Each option fills the blank to give a *context*
(the text up to and including the option); the ending after the blank is shared. The
model picks the option whose context makes the shared ending most likely. In lm-eval's
multiple-choice terms the "choices" are the contexts, the "text" is the index of the
right one and the "target" is the ending.
"""

from __future__ import annotations

from typing import Any


def _blank(doc: dict[str, Any]) -> int:
    return int(doc["sentence"].index("_"))


def doc_to_text(doc: dict[str, Any]) -> int:
    """Index of the right option: ``answer`` is ``"1"`` or ``"2"``."""
    return {"1": 0, "2": 1}[doc["answer"]]


def doc_to_target(doc: dict[str, Any]) -> str:
    """The shared ending: the text after the blank, without surrounding spaces."""
    return str(doc["sentence"][_blank(doc) + 1 :].strip())


def doc_to_choice(doc: dict[str, Any]) -> list[str]:
    """The two contexts: the text before the blank followed by each option."""
    head = doc["sentence"][: _blank(doc)]
    return [head + doc["option1"], head + doc["option2"]]

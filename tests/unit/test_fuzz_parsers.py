"""The parser fuzz properties of tests/fuzzing.py, briefly (``scripts/fuzz_parsers.py`` runs them long)."""

from __future__ import annotations

import pytest

from tests.fuzzing import TARGETS, Target, run

EXAMPLES = 100  # a few seconds in make test; scripts/fuzz_parsers.py runs >= 10,000 each


@pytest.mark.parametrize("target", TARGETS, ids=[t.name.split(" (")[0] for t in TARGETS])
def test_parser_raises_only_its_declared_errors(target: Target) -> None:
    assert run(target, EXAMPLES) > 0

"""The pure helpers of ``scripts/bench_detect.py``: what it reads from pystun3's CLI and from detect's log,
and the ground truth it holds both tools to (the same labels the detect lab tests assert)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import stun

from tcppunch.lab import NatType
from tests.lab.test_detect_lab import UDP_LABEL


def _script() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_detect.py"
    spec = importlib.util.spec_from_file_location("bench_detect", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


bench = _script()


def test_pystun3_label_is_read_from_its_cli_output() -> None:
    out = "NAT Type: Restric Port NAT\nExternal IP: None\nExternal Port: None\n"
    assert bench.pystun3_label(out, 0) == stun.RestricPortNAT
    assert bench.pystun3_label("NAT Type: Blocked\n", 0) == stun.Blocked
    assert bench.pystun3_label("", 1) == "exit 1, no 'NAT Type:' line"


def test_detect_seconds_comes_from_the_detect_done_line_only() -> None:
    lines = ["not json", json.dumps({"event": "mapping_measured", "seconds": 9.0}),
             json.dumps({"event": "detect_done", "seconds": 0.412, "report": {}})]
    assert bench.detect_seconds("\n".join(lines)) == pytest.approx(0.412)
    assert bench.detect_seconds("\n".join(lines[:2])) is None


@pytest.mark.parametrize("nat", list(NatType), ids=[t.value for t in NatType])
def test_classic_label_is_the_lab_tests_ground_truth(nat: NatType) -> None:
    label = bench.classic_label(nat.mapping.value, nat.filtering.value, nat is not NatType.NONE)
    assert label == UDP_LABEL[nat]

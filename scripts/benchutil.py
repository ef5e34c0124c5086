"""Small pieces the benchmark scripts share: sizes on the command line. (Starting the lab's server and
stopping a process by PID: :mod:`tcppunch.lab.server_process`, which the tests use too.)"""

from __future__ import annotations

import argparse
import re


def parse_size(text: str) -> int:
    """``1GiB``, ``1.5GiB``, ``512MiB``, ``64K`` or plain bytes -> bytes; a clear argparse error otherwise."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]i?B?)?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1GiB, 512MiB, 1000000)")
    unit = (m.group(2) or "").upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit])

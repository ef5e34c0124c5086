"""Small pieces the benchmark scripts share: sizes on the command line, stopping a helper process."""

from __future__ import annotations

import argparse
import re
import subprocess
from typing import Any


def parse_size(text: str) -> int:
    """``1GiB``, ``1.5GiB``, ``512MiB``, ``64K`` or plain bytes -> bytes; a clear argparse error otherwise."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]i?B?)?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1GiB, 512MiB, 1000000)")
    unit = (m.group(2) or "").upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit])


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after 10 s; waits for the process either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

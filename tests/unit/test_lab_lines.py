"""wait_for_line: the line found, the process ending first, a silent process (bounded)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tcppunch.lab.lines import LineTimeout, Tail, wait_for_line


def _proc(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_lines_already_buffered_are_found() -> None:
    proc = _proc("print('key 1'); print('listening on x', flush=True); import time; time.sleep(30)")
    try:
        assert wait_for_line(proc.stdout, "listening on", 10)[-1] == "listening on x\n"  # type: ignore[arg-type]
    finally:
        proc.kill()
        proc.wait(5)


def test_eof_and_silence_are_errors_that_quote_the_output() -> None:
    ended = _proc("print('something else')")
    with pytest.raises(LineTimeout, match=r"ended before saying 'ready'.*something else"):
        wait_for_line(ended.stdout, "ready", 10)  # type: ignore[arg-type]
    ended.wait(5)
    silent = _proc("import time; time.sleep(30)")
    try:
        with pytest.raises(LineTimeout, match=r"within 0\.2 s"):
            wait_for_line(silent.stdout, "ready", 0.2)  # type: ignore[arg-type]
    finally:
        silent.kill()
        silent.wait(5)


def test_a_tail_stops_waiting_when_the_stream_ends() -> None:
    """A wait for a line that can no longer come ends with the stream, not with its timeout."""
    ended = _proc("print('Error: no such option')")
    try:
        assert ended.stdout is not None
        tail = Tail(ended.stdout)
        assert tail.wait_for("listening on", 30) is False
        assert tail.ended and tail.text == "Error: no such option\n"
        assert tail.wait_for("no such option", 30) is True
    finally:
        ended.wait(5)

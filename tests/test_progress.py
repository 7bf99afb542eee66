"""Progress off a terminal (issue 24, item 2): a long loop logs a line at least every 30 s with count and ETA."""
from __future__ import annotations

import io
import sys

import pytest

import surgeon.context as context_mod
from surgeon.context import Context, LineProgress


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(context_mod, "_clock", c)
    return c


def _not_a_tty(monkeypatch) -> io.StringIO:
    err = io.StringIO()  # StringIO.isatty() is False, like a pipe or a log file
    monkeypatch.setattr(sys, "stderr", err)
    return err


def test_slow_loop_logs_a_line_every_30_seconds_with_eta(monkeypatch, clock):
    _not_a_tty(monkeypatch)
    lines: list[str] = []
    ctx = Context(quiet=False)
    monkeypatch.setattr(ctx, "log", lines.append)
    for i in ctx.progress(range(10), description="PERP"):
        clock.now += 7.0  # each item takes 7 s: a line after items 5 (35 s) and 10 (70 s)
        if i == 3:
            ctx.status("loss 2.500")
    assert lines == ["PERP: 5/10 (50%), 35s elapsed, ETA 35s, loss 2.500",
                     "PERP: 10/10 (100%), 1m10s elapsed, ETA 0s, loss 2.500"]


def test_gap_between_lines_never_exceeds_interval_plus_one_item(monkeypatch, clock):
    _not_a_tty(monkeypatch)
    stamps: list[float] = []
    ctx = Context(quiet=False)
    monkeypatch.setattr(ctx, "log", lambda _m: stamps.append(clock.now))
    for _ in ctx.progress(range(200), description="x"):
        clock.now += 4.0
    gaps = [b - a for a, b in zip([1000.0, *stamps], stamps)]
    assert len(stamps) == 200 * 4 // 32  # every 8th item (32 s): 25 lines
    assert max(gaps) <= 30.0 + 4.0


def test_fast_loop_stays_silent_and_quiet_is_silent(monkeypatch, clock):
    _not_a_tty(monkeypatch)
    lines: list[str] = []
    ctx = Context(quiet=False)
    monkeypatch.setattr(ctx, "log", lines.append)
    for _ in ctx.progress(range(100), description="fast"):
        clock.now += 0.1  # 10 s in all: no line needed
    assert lines == []
    quiet = Context(quiet=True)
    monkeypatch.setattr(quiet, "log", lines.append)
    for _ in quiet.progress(range(10), description="q"):
        clock.now += 100.0
    assert lines == []


def test_line_progress_unknown_total_and_bytes(clock):
    out: list[str] = []
    p = LineProgress(out.append, "sampling", None)
    clock.now += 95.0
    p.advance(3)
    assert out == ["sampling: 3, 1m35s elapsed"]
    w = LineProgress(out.append, "writing", 400e6, unit="B")
    clock.now += 40.0
    w.advance(100e6)
    assert out[-1] == "writing: 100 MB/400 MB (25%), 40s elapsed, ETA 2m00s"


def test_log_lines_reach_stderr_without_rich_markup(monkeypatch, clock):
    err = _not_a_tty(monkeypatch)
    ctx = Context(quiet=False)
    for _ in ctx.progress(range(2), description="key statistics"):
        clock.now += 31.0
    text = err.getvalue()
    assert "key statistics: 1/2 (50%), 31s elapsed, ETA 31s" in text
    assert "\x1b[" not in text  # no terminal escape codes in a log file


def test_long_log_lines_are_not_wrapped_off_a_terminal(monkeypatch):
    err = _not_a_tty(monkeypatch)
    message = "model:12: sampling 12 × 256 tokens from the run's input model " + "x" * 120
    Context(quiet=False).log(message)
    assert err.getvalue() == message + "\n"

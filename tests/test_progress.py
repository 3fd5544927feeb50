"""Plain progress lines where the output is not a terminal (CI logs, tee): issue 29."""

from __future__ import annotations

from tl_cli.core import console


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_progress_prints_a_line_every_30_seconds_in_logs(monkeypatch, capsys):
    clock = _Clock()
    monkeypatch.setattr(console.time, "time", clock)
    monkeypatch.setattr(console, "interactive", lambda: False)
    with console.progress("caching features", total=100) as advance:
        for _ in range(100):
            clock.t += 1.0  # one second a batch: 100 s in all
            advance()
    lines = capsys.readouterr().out.strip().splitlines()
    steps = [ln for ln in lines if ln.startswith("caching features: ") and "%" in ln]
    # a line at 30, 60 and 90 s (not one per batch), each with done/total and time left
    assert [s.split(" (")[0] for s in steps] == [
        "caching features: 30/100",
        "caching features: 60/100",
        "caching features: 90/100",
    ]
    assert "(30%), 30s, about 1m10s left" in steps[0]
    assert lines[-1] == "caching features: 100 batches in 100.0s"


def test_short_work_prints_only_its_end_line(monkeypatch, capsys):
    clock = _Clock()
    monkeypatch.setattr(console.time, "time", clock)
    monkeypatch.setattr(console, "interactive", lambda: False)
    with console.progress("scan", total=10) as advance:
        for _ in range(10):
            clock.t += 0.5
            advance()
    assert capsys.readouterr().out.strip().splitlines() == ["scan: 10 batches in 5.0s"]


def test_duration_reads_at_a_glance():
    assert [console.duration(s) for s in (4.4, 65, 3725)] == ["4s", "1m05s", "1h02m"]


def test_a_long_image_scan_shows_progress(monkeypatch, capsys, tmp_path):
    from PIL import Image

    from tl_cli.data import scan

    paths = []
    for i in range(3):
        Image.new("RGB", (4, 4)).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    assert scan.scan_images(paths) == [] and "checking images" not in capsys.readouterr().out
    monkeypatch.setattr(scan, "SCAN_PROGRESS_FROM", 3)  # as if it were a large folder
    assert scan.scan_images(paths) == []
    assert "checking images: 3 files in" in capsys.readouterr().out


def test_work_that_stopped_early_says_how_far_it_got(monkeypatch, capsys):
    """Issue 29: an interrupted tl pretrain printed the planned total as done."""
    monkeypatch.setattr(console, "interactive", lambda: False)
    with console.progress("pretrain steps", total=500) as advance:
        for _ in range(50):
            advance()
    assert "pretrain steps: stopped after 50 of 500 batches in" in capsys.readouterr().out

"""Console output: rich progress on a terminal, plain lines at a steady pace elsewhere (CI, tee).

This module imports no torch or Lightning (``tl`` prints its first line and its config errors
before those load); the Lightning callbacks that print epochs live in `tl_cli.run.callbacks`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.table import Table

from tl_cli.core.errors import log_line

# Not a terminal (CI logs, pipes): no wrapping at 80 columns.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)


def interactive() -> bool:
    """A terminal a person watches (not CI, not a pipe)."""
    return sys.stdout.isatty() and not os.environ.get("CI")


def rank_zero() -> bool:
    return (
        int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
    )


def say(msg: str) -> None:
    """Print a (rich markup) line, and write it to the run's log file."""
    if rank_zero():
        console.print(msg)
        from rich.text import Text

        log_line(Text.from_markup(msg).plain)


def show(renderable: Any) -> None:
    """Print a rich renderable (a table), and write its plain text to the run's log file."""
    if rank_zero():
        console.print(renderable)
        plain = Console(width=120, color_system=None, soft_wrap=True)
        with plain.capture() as cap:
            plain.print(renderable)
        log_line("\n" + cap.get().rstrip())


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def warn(msg: str) -> None:
    """One line a practitioner would say, marked so it stands out in a log."""
    say(f"[bold yellow]warning[/] {msg}")


#: not a terminal: a plain progress line at most this often (seconds) during long work
PLAIN_EVERY_S = 30.0


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``: a time a person reads at a glance."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Ticker:
    """Plain progress lines for logs (not a terminal): ``desc: 120/400 (30%), 1m10s, about 2m40s
    left``, at most one every ``every`` seconds, so a CI log shows a long step is alive without
    one line per batch. On a terminal it prints nothing (the rich bar shows progress there)."""

    def __init__(self, desc: str, total: int | None, every: float = PLAIN_EVERY_S) -> None:
        self.desc, self.total, self.every = desc, total, every
        self.t0 = self.last = time.time()
        self.enabled = not interactive() and rank_zero()

    def line(self, done: int) -> str:
        elapsed = time.time() - self.t0
        if self.total:
            left = elapsed / max(done, 1) * (self.total - done)
            return (
                f"{self.desc}: {done}/{self.total} ({100 * done / self.total:.0f}%), "
                f"{duration(elapsed)}, about {duration(left)} left"
            )
        return f"{self.desc}: {done} done, {duration(elapsed)}"

    def update(self, done: int) -> None:
        """Called after each unit of work; prints when ``every`` seconds have passed."""
        if not self.enabled or (self.total and done >= self.total):
            return
        now = time.time()
        if now - self.last >= self.every:
            self.last = now
            say(self.line(done))


@contextlib.contextmanager
def progress(desc: str, total: int, unit: str = "batch") -> Iterator[Callable[[], None]]:
    """Yield an ``advance()`` callable: a rich bar on a terminal; elsewhere a plain line every
    `PLAIN_EVERY_S` seconds (`Ticker`). Both end with one line: how many ``unit``s, how long;
    work that stopped early (an interrupt) says how far it got, never the planned total."""

    def plural(n: int) -> str:
        return unit if n == 1 else (f"{unit}es" if unit.endswith(("s", "ch")) else f"{unit}s")

    t0 = time.time()
    done = [0]

    def end_line() -> str:
        took = f"in {time.time() - t0:.1f}s"
        if done[0] >= total:
            return f"{desc}: {total} {plural(total)} {took}"
        return f"{desc}: stopped after {done[0]} of {total} {plural(total)} {took}"

    if interactive() and rank_zero():
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        ) as p:
            task = p.add_task(desc, total=total)

            def advance_bar() -> None:
                done[0] += 1
                p.advance(task)

            yield advance_bar
        say(end_line())  # the bar goes; its timing stays
        return
    ticker = Ticker(desc, total)

    def advance() -> None:
        done[0] += 1
        ticker.update(done[0])

    yield advance
    say(end_line())


def fmt(v: Any, key: str = "") -> str:
    if isinstance(v, float) and key.endswith("seconds"):
        return f"{v:.1f}s"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def summary_table(title: str, metrics: dict[str, Any], keys: list[str] | None = None) -> None:
    if not rank_zero():
        return
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k in keys or list(metrics):
        if k in metrics and not isinstance(metrics[k], dict | list):
            t.add_row(k, fmt(metrics[k], k))
    show(t)


def stage_table(rows: list[dict[str, Any]]) -> None:
    """``head only`` vs ``fine-tuned``: each stage's best epoch, and which one best.ckpt holds."""
    if not rank_zero():
        return
    t = Table(title="head only vs fine-tuned (best epoch of each)", header_style="bold")
    cols = ["train/acc", "val/acc", "val/loss"]
    t.add_column("stage")
    t.add_column("epoch", justify="right")
    for c in cols:
        t.add_column(c, justify="right")
    paired = any("val/gained" in r for r in rows)
    if paired:  # classification: val items gained / lost against the head alone
        t.add_column("val items vs head only", justify="right")
    t.add_column("best.ckpt")
    for r in rows:
        vs = [f"+{r['val/gained']:.0f} / -{r['val/lost']:.0f}" if "val/gained" in r else ""]
        t.add_row(
            r["stage"],
            str(r["epoch"]),
            *(fmt(r[c], c) if c in r else "-" for c in cols),
            *(vs if paired else []),
            "yes" if r.get("in_best_ckpt") else "",
        )
    show(t)

"""Shared helpers for the benchmark scripts (bench_cifar, bench_cache, bench_learning_curve).

Each benchmark runs the real ``tl`` executable in a subprocess, reads its metrics.json, measures
the child's wall time and peak RSS, and writes its own section of docs/benchmarks.md (between
``<!-- BEGIN name -->`` / ``<!-- END name -->`` markers, so the three scripts share one file).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TL = Path(sys.executable).with_name("tl")
DEFAULT_DATA = (ROOT.parent / "shared" / "data" / "cifar10-subset").resolve()
DOC = ROOT / "docs" / "benchmarks.md"

DOC_HEADER = """# Benchmarks

Numbers measured on the development machine with the scripts under `scripts/`. Each script runs the
real `tl` executable in subprocesses, prints its table, and rewrites its own section of this file
(between the `BEGIN`/`END` comments), so the sections can be refreshed one at a time.

**Timings are noisy.** The machine is shared: other engineers ran test suites on the same 2 CPU
cores while these numbers were taken, and each benchmark was run only once. Treat every time, rate
and ratio below as +/- 20-30%, and compare rows of one table (taken minutes apart) rather than
numbers across tables.
"""


# --------------------------------------------------------------------------- machine


def machine() -> str:
    """One line: CPU model, cores, RAM, torch version and threads, GPU or not."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f", {int(line.split()[1]) / 2**20:.0f} GiB RAM"
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{os.cpu_count()} CPU cores ({model}){mem}, {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads)"
    )


def command_line() -> str:
    """The command that is running now, as a reader would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_s = str(script.relative_to(ROOT))
    except ValueError:
        script_s = str(script)
    py = Path(sys.executable)
    try:
        py_s = str(py.relative_to(ROOT))
    except ValueError:
        py_s = "python"
    return shlex.join([py_s, script_s, *sys.argv[1:]])


def rel(p: Path | str) -> str:
    """A path relative to the repository root when it is under (or next to) it."""
    p = Path(p).resolve()
    for base, prefix in ((ROOT, ""), (ROOT.parent, "../")):
        try:
            return prefix + str(p.relative_to(base))
        except ValueError:
            continue
    return str(p)


# --------------------------------------------------------------------------- running tl


class TreePeak(threading.Thread):
    """Samples the summed RSS of a process and its descendants (data-loader workers) from /proc."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.peak_mb = pid, every, 0.0
        self.stop = threading.Event()

    def _tree(self) -> list[int]:
        pids, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            pids.append(p)
            try:
                for task in os.listdir(f"/proc/{p}/task"):
                    with open(f"/proc/{p}/task/{task}/children") as f:
                        todo += [int(c) for c in f.read().split()]
            except OSError:
                pass
        return pids

    @staticmethod
    def _rss_mb(pid: int) -> float:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.peak_mb = max(self.peak_mb, sum(self._rss_mb(p) for p in self._tree()))


def run_tl(
    command: str,
    overrides: list[str],
    run_dir: Path,
    log: Path | None = None,
    result: str = "metrics.json",
) -> dict[str, Any]:
    """Run ``tl <command> <overrides> hydra.run.dir=<run_dir>``; return metrics and measurements.

    ``result``: the JSON file the command writes in its run dir (``eval.json`` for ``tl eval``).

    ``peak_rss_mb``: ru_maxrss of the child from ``os.wait4`` (the largest single process of the
    tree: the tl process itself; loader workers are smaller). ``tree_rss_mb``: the largest sum of
    RSS over the process and its workers, sampled every 0.2 s (counts pages shared by the forked
    workers more than once, so it is an upper bound).
    """
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(TL), command, *overrides, f"hydra.run.dir={run_dir}"]
    if command in ("train", "finetune"):
        cmd.append("overwrite=true")  # the benchmark reruns into the same run dirs
    log = log or run_dir.with_suffix(".log")
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "CI": "1"}
        )
        sampler = TreePeak(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop.set()
        sampler.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"tl failed (rc {proc.returncode}): {shlex.join(cmd)}\n{tail}")
    metrics = json.loads((run_dir / result).read_text())
    return {
        "cmd": display_cmd(command, overrides),
        "metrics": metrics,
        "wall_seconds": round(wall, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
        "tree_rss_mb": round(max(sampler.peak_mb, usage.ru_maxrss / 1024)),
    }


def display_cmd(command: str, overrides: list[str]) -> str:
    """``tl <command> <overrides>`` with paths shown relative to the repository root."""
    shown = []
    for o in overrides:
        k, _, v = o.partition("=")
        if v.startswith("/") and Path(v).exists():
            o = f"{k}={rel(v)}"
        shown.append(o)
    return shlex.join(["tl", command, *shown])


# --------------------------------------------------------------------------- output


def md_table(headers: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    """A markdown table; ``align`` is one char per column, ``l`` or ``r`` (default: text left,
    numbers right)."""
    if align is None:
        align = "".join(
            "r" if rows and isinstance(rows[0][i], int | float) else "l"
            for i in range(len(headers))
        )
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.rjust(w[i]) for i, c in enumerate(r)) for r in cells)


# fixed order of the sections in docs/benchmarks.md
SECTIONS = ["cifar", "cache", "learning_curve"]


def write_section(name: str, body: str, doc: Path = DOC) -> None:
    """Replace (or add) the section ``name`` of ``doc``, keeping the others."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = doc.read_text() if doc.exists() else DOC_HEADER
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        text = pre + block + post
    else:
        # insert before the first later section that exists, else append
        later = SECTIONS[SECTIONS.index(name) + 1 :] if name in SECTIONS else []
        for s in later:
            marker = f"<!-- BEGIN {s} -->"
            if marker in text:
                pre, post = text.split(marker, 1)
                text = pre + block + "\n\n" + marker + post
                break
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def save_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")

"""How fast `tl` answers: help, the backbone list, config and path errors, and the start-up of
`tl train` up to its first training batch (issue 29, "a fast first second").

Each command runs as a whole process (the real ``tl`` executable), ``--runs`` times after one
warm-up; the table gives the median wall time with min and max, and the CPU time (user + sys of
the process and its children). The 1-minute load average before and after is printed with the
table: on a shared machine a busy minute can double a figure.

`tl train` start-up: ``tl train`` on the built-in sample with the feature cache and the L-BFGS head
fit turned off (so the first batch is the first thing after start-up), a callback that prints the
time of the first training batch, and the process stopped there. The data scan is timed on its own
(the sample's ``prepare()`` in this process) and subtracted: what is left is Python, imports,
Hydra, the config checks, the model build with its pretrained weights and Lightning's set-up.

    python scripts/bench_startup.py [--runs 5] [--no-doc]

Targets (issue 29): config and path errors <= 3 s, ``tl backbones`` <= 3 s, ``tl --help`` <= 1 s,
``tl train`` start-up minus the data scan <= 3 s.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_util import TL, command_line, machine, md_table, write_section  # noqa: E402

try:  # the callback below is instantiated by tl train from +callbacks.first._target_
    import pytorch_lightning as _pl

    class FirstBatch(_pl.Callback):
        """Prints the wall-clock time of the first training batch, then the bench stops tl."""

        def __init__(self) -> None:
            self.done = False

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            if not self.done:
                self.done = True
                print(f"BENCH_FIRST_BATCH {time.time():.6f}", flush=True)

    class ExitAtFirstBatch(FirstBatch):
        """Ends the process at its first training batch (exit 0), so that an outside timer of the
        whole process (``/usr/bin/time -v``, a benchmark harness) reads launch-to-first-batch."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
            os._exit(0)

except ImportError:  # pragma: no cover - the bench itself needs no Lightning to time commands
    pass

#: (label, target seconds, arguments after ``tl``)
COMMANDS = [
    ("tl --help", 1.0, ["--help"]),
    ("tl backbones", 3.0, ["backbones"]),
    ("tl train trainer.max_epoch=1 (key typo)", 3.0, ["train", "trainer.max_epoch=1"]),
    ("tl train trainer.max_epochs=0 (bad value)", 3.0, ["train", "trainer.max_epochs=0"]),
    (
        "tl train dataset=imagefolder dataset.root=/no/such/folder",
        3.0,
        ["train", "dataset=imagefolder", "dataset.root=/no/such/folder"],
    ),
    (
        "tl train modality=text dataset.root=nolabel.csv (no label column)",
        3.0,
        ["train", "modality=text", "dataset.root=nolabel.csv"],
    ),
    ("tl eval checkpoint=/no/such.ckpt", 3.0, ["eval", "checkpoint=/no/such.ckpt"]),
]
TRAIN = [
    "train",
    "strategy.cache_features=false",
    "strategy.head_fit=sgd",
    "trainer.max_epochs=1",
    "dataset.num_workers=0",
    "+callbacks.first._target_=bench_startup.FirstBatch",
]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def time_command(args: list[str], runs: int, cwd: Path) -> tuple[list[float], list[float], int]:
    """Wall and CPU seconds of ``tl ARGS`` per counted run, and its exit code."""
    walls, cpus, rc = [], [], 0
    for i in range(runs + 1):
        c0, t0 = _children_cpu(), time.perf_counter()
        r = subprocess.run([str(TL), *args], cwd=cwd, capture_output=True, text=True)
        wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
        rc = r.returncode
        if i:  # the first run warms the page cache
            walls.append(wall)
            cpus.append(cpu)
    return walls, cpus, rc


def train_startup(runs: int, cwd: Path) -> list[float]:
    """Seconds from launching ``tl train`` to its first training batch, per counted run."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    out = []
    for i in range(runs + 1):
        run_dir = cwd / f"train{i}"
        t0 = time.time()
        p = subprocess.Popen(
            [str(TL), *TRAIN, f"hydra.run.dir={run_dir}"],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        first = None
        assert p.stdout is not None
        for line in p.stdout:
            if line.startswith("BENCH_FIRST_BATCH"):
                first = float(line.split()[1])
                break
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        if first is None:
            raise SystemExit("tl train ended before its first batch")
        if i:
            out.append(first - t0)
    return out


def scan_seconds(runs: int) -> float:
    """The built-in sample's data scan (``prepare()``: listing, corrupt-file check, split)."""
    from tl_cli.data.base import DATASETS
    from tl_cli.modalities.image import data  # noqa: F401 - registers the sample

    times = []
    for _ in range(runs):
        dm = DATASETS.build({"name": "sample", "num_workers": 0})
        t0 = time.perf_counter()
        dm.prepare()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        (cwd / "nolabel.csv").write_text("text\ngreat value\nbroke in a week\n")
        for label, target, cmd in COMMANDS:
            walls, cpus, rc = time_command(cmd, args.runs, cwd)
            med = statistics.median(walls)
            rows.append([label, rc, fmt(walls), f"{statistics.median(cpus):.2f}", f"<= {target:g}",
                         "met" if med <= target else "not met"])  # fmt: skip
            print(rows[-1], flush=True)
        starts = train_startup(args.runs, cwd)
        scan = scan_seconds(args.runs)
        net = [s - scan for s in starts]
        rows.append(["tl train: launch to first batch", 0, fmt(starts), "", "", ""])
        rows.append(["  of which the data scan (built-in sample, 800 images)", "", f"{scan:.2f}",
                     "", "", ""])  # fmt: skip
        med = statistics.median(net)
        rows.append(["  start-up minus the scan", "", fmt(net), "", "<= 3",
                     "met" if med <= 3 else "not met"])  # fmt: skip
        imports = []
        for mod in ("pytorch_lightning", "tl_cli.commands.train"):
            walls, _, _ = time_command_py(mod, args.runs)
            imports.append([f"python -c 'import {mod}'", 0, fmt(walls), "", "", ""])
        rows += imports
    load1 = os.getloadavg()[0]
    headers = ["command", "exit", "wall s, median (min-max)", "CPU s", "target", ""]
    table = md_table(headers, rows, "lrrrrl")
    print(table)
    print(f"load average (1 min): {load0:.1f} before, {load1:.1f} after")
    if args.no_doc:
        return
    body = f"""## Start-up: help, listings, config errors, the first batch

```bash
{command_line()}
```

Each command is the real `tl` executable, run {args.runs} times after a warm-up, from an empty
folder; wall time median (min-max), CPU time (user + sys) median. Machine: {machine()}.
Load average (1 minute) {load0:.1f} before, {load1:.1f} after: the machine is shared, so treat the
times as +/- 30%.

{table}

- Errors are caught before torch loads (`tl_cli/run/preflight.py`, `tl_cli/run/early.py`): a key
  typo, a bad value, a missing folder or checkpoint. `tl backbones` reads the registry rows
  (`tl_cli/modalities/*/specs.py`) without building a model.
- `tl train` start-up: `{" ".join(["tl", *TRAIN])}` (the feature cache and the L-BFGS head fit
  off, so the first batch is the first thing after start-up), from launch to the first training
  batch, minus the data scan timed on its own. Most of it is importing torch and Lightning (the
  `import pytorch_lightning` row: Lightning imports torchmetrics, which imports torchvision,
  scipy and transformers), which no command can avoid once it trains.
"""
    write_section("startup", body)


def time_command_py(module: str, runs: int) -> tuple[list[float], list[float], int]:
    walls, cpus = [], []
    for i in range(runs + 1):
        c0, t0 = _children_cpu(), time.perf_counter()
        r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True)
        if i:
            walls.append(time.perf_counter() - t0)
            cpus.append(_children_cpu() - c0)
    return walls, cpus, r.returncode


if __name__ == "__main__":
    main()

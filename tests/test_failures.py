"""Faults (issue 5): SIGINT, SIGTERM, SIGKILL (also mid-checkpoint-write), NaN/inf loss, bad
checkpoints, output folders. Nothing half-written, nothing garbage saved, one clear line."""

from __future__ import annotations

import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import open_dict

from tests.conftest import TINY, compose_cfg, run_tl
from tl_cli.core import checkpoint
from tl_cli.core.checkpoint import atomic_save, read_checkpoint
from tl_cli.core.errors import TLError
from tl_cli.run import safety
from tl_cli.run.safety import AtomicCheckpointIO, NonFiniteError, TrainingGuard, stale_temp_files

# --------------------------------------------------------------------------- helpers

# The real CLI entry point, with two test-only knobs injected from outside the product code:
# TL_TEST_STEP_SLEEP slows every training step (so a signal lands mid-training), and
# TL_TEST_PAUSE_AT_WRITE=N makes the N-th checkpoint write stop halfway for two minutes (so a
# SIGKILL lands mid-write, with half a file on disk).
CHILD = r"""
import io, os, sys, time
import tl_cli.core.checkpoint as s
from tl_cli.tasks.classification import ClassificationTask as _Task
_orig, _n = s._serialize, [0]
pause_at = int(os.environ.get("TL_TEST_PAUSE_AT_WRITE", "0"))
def _slow_write(obj, f):
    _n[0] += 1
    if not pause_at or _n[0] < pause_at:
        return _orig(obj, f)
    buf = io.BytesIO(); _orig(obj, buf); data = buf.getvalue()
    f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
    time.sleep(120)
    f.write(data[len(data) // 2 :])
s._serialize = _slow_write
step_sleep = float(os.environ.get("TL_TEST_STEP_SLEEP", "0"))
if step_sleep:
    _step = _Task.training_step
    def _slow_step(self, *a, **k):
        time.sleep(step_sleep)
        return _step(self, *a, **k)
    _Task.training_step = _slow_step
from tl_cli.cli import main
sys.argv[0] = "tl"
main()
"""


def spawn(*args: str, env: dict | None = None) -> subprocess.Popen:
    e = {**os.environ, "CI": "1", **(env or {})}
    e.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *args],
        env=e,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(cond, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    t0 = time.time()
    while not cond():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(
                f"process ended (rc {proc.returncode}) before the condition held:\n{err[-3000:]}"
            )
        if time.time() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.005)


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)


def finite_weights(ckpt: dict) -> bool:
    return all(
        torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point()
    )


def all_checkpoints_load(ckpt_dir: Path) -> dict[str, dict]:
    """Every *.ckpt in the folder is a complete, readable tl checkpoint."""
    out = {}
    for p in sorted(ckpt_dir.glob("*.ckpt")):
        out[p.name] = read_checkpoint(p)  # raises TLError on a half-written file
        assert finite_weights(out[p.name]), p
    return out


def single_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("tl: error: "), stderr[-3000:]
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture
def restore_sigint():
    """Lightning sets SIGINT to SIG_IGN on an interrupt and never restores it."""
    old = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, old)


# Interrupts land mid-epoch (batch 1): on a head that trains by SGD every batch is a step. (An
# L-BFGS head on a frozen backbone takes no step and serves each epoch as one batch.)
SGD = "strategy.head_fit=sgd"


class RaiseAt(pl.Callback):
    """Simulate a signal arriving at (epoch, batch) of training."""

    def __init__(self, epoch: int, batch: int, action) -> None:
        self.epoch, self.batch, self.action = epoch, batch, action

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            self.action()


def _keyboard_interrupt() -> None:
    raise KeyboardInterrupt


def _sigterm() -> None:
    # Lightning installs its own SIGTERM handler during fit: it only sets a flag. Never send the
    # signal to the test process without one.
    assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
    os.kill(os.getpid(), signal.SIGTERM)


# --------------------------------------------------------------------------- atomic writes


def test_atomic_save_writes_a_loadable_file_with_normal_permissions(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "x.ckpt"
    atomic_save({"a": torch.ones(3)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(3))
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
    assert list(target.parent.iterdir()) == [target]  # no temp file left


def test_atomic_save_interrupted_mid_write_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "last.ckpt"
    atomic_save({"v": torch.tensor([1.0])}, target)
    before = target.read_bytes()

    def half_then_die(obj, f):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of torch.save

    monkeypatch.setattr(checkpoint, "_serialize", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"v": torch.tensor([2.0])}, target)
    assert target.read_bytes() == before
    assert list(tmp_path.iterdir()) == [target]  # the temp file was removed


def test_trainer_writes_checkpoints_through_the_atomic_plugin(tiny_cfg, monkeypatch) -> None:
    from tl_cli.commands.train import run

    seen = []
    monkeypatch.setattr(
        safety,
        "atomic_save",
        lambda obj, path, _orig=atomic_save: (seen.append(Path(path).name), _orig(obj, path)),
    )
    run(tiny_cfg("trainer.max_epochs=1"))
    assert "best.ckpt" in seen and "last.ckpt" in seen


def test_stale_temp_files_are_removed_at_the_next_fit(tiny_cfg, tmp_path: Path) -> None:
    from tl_cli.commands.train import run

    ckpt_dir = tmp_path / "run" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    stale = ckpt_dir / ".last.ckpt.abc123.tmp"
    stale.write_bytes(b"half")
    assert stale_temp_files(ckpt_dir) == [stale]
    run(tiny_cfg("trainer.max_epochs=1"))
    assert not stale.exists()


def test_remote_paths_use_lightnings_writer(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(
        safety.TorchCheckpointIO, "save_checkpoint", lambda self, c, p, o=None: calls.append(p)
    )
    AtomicCheckpointIO().save_checkpoint({}, "s3://bucket/x.ckpt")
    assert calls == ["s3://bucket/x.ckpt"]


# --------------------------------------------------------------------------- NaN / inf


def test_huge_lr_nan_stops_the_run_and_keeps_the_last_good_checkpoint(
    tiny_cfg, tmp_path: Path
) -> None:
    from tl_cli.commands.train import run

    # lr=1e6: epoch 1 trains to a finite (huge) loss; epoch 2's validation loss is NaN.
    with pytest.raises(NonFiniteError) as e:
        run(tiny_cfg("optimizer.lr=1e6", "trainer.max_epochs=5", "strategy.head_fit=sgd"))
    msg = str(e.value)
    assert e.value.exit_code == 1 and "\n" not in msg
    assert "nan" in msg and "optimizer.lr=1000000.0 is probably too high" in msg
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert f"the last good checkpoint is kept: {last}" in msg
    ckpts = all_checkpoints_load(last.parent)  # finite weights in every file
    assert ckpts["last.ckpt"]["epoch"] == 0  # the epoch before it went bad
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_nan_training_loss_stops_before_the_optimizer_step(tiny_cfg, tmp_path: Path) -> None:
    from tl_cli.commands.train import run

    # lr=1e30: the second step's training loss is already NaN, long before any checkpoint.
    with pytest.raises(
        NonFiniteError,
        match=r"at epoch 1, step \d+: the training loss is nan .*no checkpoint had been written yet",
    ):
        run(tiny_cfg("optimizer.lr=1e30", "trainer.max_epochs=3", "strategy.head_fit=sgd"))
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))


def test_guard_refuses_to_checkpoint_nonfinite_weights() -> None:
    guard = TrainingGuard("/nonexistent/last.ckpt")
    trainer = SimpleNamespace(current_epoch=3, global_step=40)
    module = SimpleNamespace(hparams={"optimizer": {"lr": 0.1}})
    guard.on_save_checkpoint(
        trainer, module, {"state_dict": {"w": torch.ones(2), "n": torch.tensor([3])}}
    )
    with pytest.raises(
        NonFiniteError, match=r"weight head.w is not finite, so no checkpoint was written"
    ):
        guard.on_save_checkpoint(
            trainer, module, {"state_dict": {"head.w": torch.tensor([1.0, float("inf")])}}
        )


def test_cli_nan_is_one_line_exit_1(tmp_path: Path, tiny_data: Path) -> None:
    r = run_tl(
        "train",
        *TINY,
        f"dataset.root={tiny_data}",
        "optimizer.lr=1e30",
        "strategy.head_fit=sgd",  # the L-BFGS head has no LR to blow up
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert r.returncode == 1
    assert "training stopped at epoch 1" in single_error_line(r.stderr)


# --------------------------------------------------------------------------- SIGINT / SIGTERM (in-process)


def _run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def test_ctrl_c_after_an_epoch_keeps_last_ckpt_and_resume_completes(
    tiny_cfg, tmp_path: Path, restore_sigint
) -> None:
    from tl_cli.commands.train import run

    with pytest.raises(TLError) as e:
        run(tiny_cfg("trainer.max_epochs=4", SGD), callbacks=[RaiseAt(2, 1, _keyboard_interrupt)])
    last = _run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    assert e.value.exit_code == 130
    assert f"training interrupted (SIGINT); kept {last} from the last finished epoch" in str(
        e.value
    )
    assert (
        f"resume with: tl train <same overrides> ckpt_path={last} hydra.run.dir={_run_dir(tmp_path)}"
        in str(e.value)
    )
    assert read_checkpoint(last)["epoch"] == 1  # epochs 1 and 2 (0-based 0, 1) finished
    metrics = run(tiny_cfg("trainer.max_epochs=4", SGD, f"ckpt_path={last}"))
    assert metrics["epochs"] == 4 and [h["epoch"] for h in metrics["history"]] == [0, 1, 2, 3]


def test_ctrl_c_in_the_first_epoch_saves_the_current_state(
    tiny_cfg, tmp_path: Path, restore_sigint
) -> None:
    from tl_cli.commands.train import run

    with pytest.raises(TLError, match=r"saved the current state to .*last.ckpt") as e:
        run(tiny_cfg("trainer.max_epochs=3", SGD), callbacks=[RaiseAt(0, 1, _keyboard_interrupt)])
    assert e.value.exit_code == 130
    last = _run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(last)
    assert ckpt["global_step"] == 2 and finite_weights(ckpt)
    metrics = run(tiny_cfg("trainer.max_epochs=3", SGD, f"ckpt_path={last}"))
    assert metrics["epochs"] == 3


def test_sigterm_stops_like_ctrl_c_with_exit_143(tiny_cfg, tmp_path: Path, restore_sigint) -> None:
    from tl_cli.commands.train import run

    old = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TLError, match=r"training interrupted \(SIGTERM\)") as e:
        run(tiny_cfg("trainer.max_epochs=4", SGD), callbacks=[RaiseAt(1, 1, _sigterm)])
    assert signal.getsignal(signal.SIGTERM) == old  # Lightning restored the handler
    assert e.value.exit_code == 143
    last = _run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["epoch"] == 0
    assert run(tiny_cfg("trainer.max_epochs=4", f"ckpt_path={last}"))["epochs"] == 4


# --------------------------------------------------------------------------- real signals (subprocess)


def _tiny_args(tiny_data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "train",
        *TINY,
        f"dataset.root={tiny_data}",
        "strategy=finetune",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


@pytest.mark.slow
def test_real_sigint_exits_130_with_a_resume_command_that_works(
    tmp_path: Path, tiny_data: Path
) -> None:
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = spawn(
        *_tiny_args(tiny_data, run_dir, "trainer.max_epochs=6"), env={"TL_TEST_STEP_SLEEP": "0.1"}
    )
    try:
        wait_for(last.exists, proc=proc)
        time.sleep(0.15)  # into epoch 2
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        kill(proc)
    assert proc.returncode == 130, err[-3000:]
    line = single_error_line(err)
    assert "training interrupted (SIGINT);" in line
    all_checkpoints_load(last.parent)
    cmd = shlex.split(line.split("resume with: ", 1)[1])
    assert (
        cmd[:2] == ["tl", "train"]
        and f"ckpt_path={last}" in cmd
        and f"dataset.root={tiny_data}" in cmd
    )
    r = run_tl(*cmd[1:])  # the printed command, as a user would paste it
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    # six fine-tuning epochs after the head-only one (trainer.max_epochs counts fine-tuning)
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 7


@pytest.mark.slow
def test_sigkill_at_several_points_never_leaves_a_half_written_checkpoint(
    tmp_path: Path, tiny_data: Path
) -> None:
    import json

    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    epochs = 8
    resume = f"ckpt_path={last}"
    slow = {"TL_TEST_STEP_SLEEP": "0.05"}

    # 1. right after the first last.ckpt appears
    proc = spawn(*_tiny_args(tiny_data, run_dir, f"trainer.max_epochs={epochs}"), env=slow)
    try:
        wait_for(last.exists, proc=proc)
    finally:
        kill(proc)
    first = all_checkpoints_load(ckpt_dir)
    assert "last.ckpt" in first

    # 2. at a random moment after the resumed run has written a new checkpoint
    mtime = last.stat().st_mtime_ns
    proc = spawn(*_tiny_args(tiny_data, run_dir, f"trainer.max_epochs={epochs}", resume), env=slow)
    try:
        wait_for(lambda: last.stat().st_mtime_ns != mtime, proc=proc)
        time.sleep(random.Random(5).uniform(0.0, 0.3))
    finally:
        kill(proc)
    second = all_checkpoints_load(ckpt_dir)
    assert second["last.ckpt"]["epoch"] > first["last.ckpt"]["epoch"]  # the resume made progress

    # 3. in the middle of a checkpoint write: half the bytes are on disk in the temp file
    proc = spawn(
        *_tiny_args(tiny_data, run_dir, f"trainer.max_epochs={epochs}", resume),
        env={**slow, "TL_TEST_PAUSE_AT_WRITE": "1"},
    )
    try:
        wait_for(lambda: any(p.stat().st_size > 0 for p in stale_temp_files(ckpt_dir)), proc=proc)
    finally:
        kill(proc)
    half = stale_temp_files(ckpt_dir)
    assert len(half) == 1
    with pytest.raises(TLError):
        # had it been written in place, this is what last/best.ckpt would be
        read_checkpoint(half[0])
    third = all_checkpoints_load(ckpt_dir)
    assert third["last.ckpt"]["epoch"] == second["last.ckpt"]["epoch"]

    # 4. a final resume completes the run and cleans up the temp file
    r = run_tl(*_tiny_args(tiny_data, run_dir, f"trainer.max_epochs={epochs}", resume))
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    total = epochs + 1  # the head-only epoch, then trainer.max_epochs of fine-tuning
    assert metrics["epochs"] == total and [h["epoch"] for h in metrics["history"]] == list(
        range(total)
    )
    assert stale_temp_files(ckpt_dir) == []
    assert read_checkpoint(last)["epoch"] == total - 1


# --------------------------------------------------------------------------- bad checkpoints


def _bad_checkpoints(tmp_path: Path, good: Path) -> dict[str, Path]:
    d = tmp_path / "bad"
    d.mkdir()
    data = good.read_bytes()
    (d / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (d / "text.ckpt").write_text("not a checkpoint\n")
    (d / "empty.ckpt").write_bytes(b"")
    torch.save(torch.ones(3), d / "tensor.ckpt")
    torch.save({"state_dict": {}}, d / "other_dict.ckpt")
    (d / "folder.ckpt").mkdir()
    return {p.name: p for p in d.iterdir()} | {"missing.ckpt": d / "missing.ckpt"}


EXPECT = {
    "missing.ckpt": "file not found",
    "folder.ckpt": "not a file",
    "truncated.ckpt": "not a readable checkpoint",
    "text.ckpt": "not a readable checkpoint",
    "empty.ckpt": "not a readable checkpoint",
    "tensor.ckpt": "not a tl checkpoint",
    "other_dict.ckpt": "not a tl checkpoint",
}


def _check_bad(call, path: Path, name: str, what: str) -> None:
    with pytest.raises(TLError) as e:
        call(path)
    msg = str(e.value)
    assert msg.startswith(f"checkpoint={path}: ") and EXPECT[name] in msg and "\n" not in msg, (
        what,
        name,
        msg,
    )
    assert e.value.exit_code == 2


def test_bad_checkpoints_for_resume(tmp_path: Path, good_ckpt: Path, tiny_cfg) -> None:
    from tl_cli.commands.train import run

    bad = _bad_checkpoints(tmp_path, good_ckpt)
    assert set(bad) == set(EXPECT)
    for name, path in bad.items():
        _check_bad(
            lambda p: run(tiny_cfg(f"ckpt_path={p}", f"output_dir={tmp_path / 'resume'}")),
            path,
            name,
            "resume",
        )
    assert not (tmp_path / "resume").exists()  # refused before any work


def test_bad_checkpoints_for_eval(tmp_path: Path, good_ckpt: Path) -> None:
    from tl_cli.commands import evaluate

    bad = _bad_checkpoints(tmp_path, good_ckpt)
    assert set(bad) == set(EXPECT)
    for name, path in bad.items():
        _check_bad(lambda p: evaluate.run(_eval_cfg(p, tmp_path)), path, name, "eval")
    assert not (tmp_path / "eval").exists()  # refused before any work


def _eval_cfg(ckpt: Path, tmp_path: Path):
    cfg = compose_cfg([f"checkpoint={ckpt}", "dataset.num_workers=0"], "eval")
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "eval")
    return cfg


@pytest.mark.slow
def test_cli_bad_checkpoints_one_line_and_traceback_only_on_request(
    tmp_path: Path, good_ckpt: Path, tiny_data: Path
) -> None:
    bad = _bad_checkpoints(tmp_path, good_ckpt)
    r = run_tl("eval", f"checkpoint={bad['truncated.ckpt']}", f"hydra.run.dir={tmp_path / 'e'}")
    assert r.returncode == 2 and "not a readable checkpoint" in single_error_line(r.stderr)
    r = run_tl(
        "train",
        *TINY,
        f"dataset.root={tiny_data}",
        f"ckpt_path={bad['text.ckpt']}",
        f"hydra.run.dir={tmp_path / 't'}",
    )
    assert r.returncode == 2 and f"checkpoint={bad['text.ckpt']}" in single_error_line(r.stderr)
    r = run_tl(
        "eval",
        f"checkpoint={bad['missing.ckpt']}",
        f"hydra.run.dir={tmp_path / 'e2'}",
        env={"HYDRA_FULL_ERROR": "1"},
    )
    assert r.returncode != 0 and "Traceback" in r.stderr and "file not found" in r.stderr


# --------------------------------------------------------------------------- output folders


def test_second_run_into_the_same_dir_is_refused_unless_overwrite(tiny_cfg, tmp_path: Path) -> None:
    from tl_cli.commands.train import run

    run(tiny_cfg("trainer.max_epochs=1"))
    best = tmp_path / "run" / "checkpoints" / "best.ckpt"
    before = best.read_bytes()
    with pytest.raises(
        TLError,
        match=rf"{best} already exists: choose another hydra.run.dir, or pass overwrite=true",
    ):
        run(tiny_cfg("trainer.max_epochs=1", "seed=7"))
    assert best.read_bytes() == before
    run(tiny_cfg("trainer.max_epochs=1", "seed=7", "overwrite=true"))
    assert best.read_bytes() != before
    read_checkpoint(best)


def test_nonfinite_check_finds_the_tensor_and_ignores_an_overflowing_sum() -> None:
    from tl_cli.run.safety import first_nonfinite

    ok = {"a": torch.ones(3), "n": torch.tensor([1, 2])}
    assert first_nonfinite(ok) is None
    # finite weights whose sum overflows float32: the quick pass flags them, the exact one clears
    assert first_nonfinite({**ok, "big": torch.full((4,), 3e38)}) is None
    assert first_nonfinite({**ok, "b": torch.tensor([1.0, float("nan")])}) == "b"
    # inf and -inf: a sum of NaN, still caught; and a lone -inf in half precision
    assert first_nonfinite({**ok, "c": torch.tensor([float("inf"), float("-inf")])}) == "c"
    assert first_nonfinite({"h": torch.tensor([1.0, float("-inf")], dtype=torch.half)}) == "h"

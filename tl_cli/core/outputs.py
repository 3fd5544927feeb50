"""Writing outputs: never over a user's file by accident, never half a file, one run per folder.

Every command writes its outputs (predictions, exports and sidecars, metrics.json, eval.json,
report.md, plots, sweep summaries, checkpoints) through this module:

* `check_output`: an existing file is refused unless ``overwrite=true``, and a file that is one of
  the run's inputs (the checkpoint, an input image, compared by device + inode, so hard links and
  symlinks are caught too) is refused even then. Called before any work.
* `atomic_path` / `atomic_file` / `write_text` / `write_bytes` / `write_json`: the bytes go to a
  hidden temp file in the same folder, which is fsynced and renamed over the target with
  ``os.replace``. A failed or interrupted write leaves the old file as it was; an ``OSError``
  (a full disk, no permission) becomes one line naming the file (exit 1).
* `write_json` / `strict_json`: strict JSON. NaN and inf are not JSON; they are written as ``null``,
  and the top-level ``"nonfinite"`` list names the keys that were not finite.
* `claim_run_dir`: a run dir that already holds tl outputs is refused unless ``overwrite=true`` or
  the run resumes from a checkpoint in it, and the dir is locked (``flock`` on ``.tl.lock``) while
  the run writes, so a second run into the same dir stops with one line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from tl_cli.core.errors import EXIT_FAILED, TLError

#: Temp files are ".<name>.<random>.tmp" (plus the target's suffix for writers that need it).
TMP_SUFFIX = ".tmp"
LOCK_NAME = ".tl.lock"
#: What a tl run leaves in its run dir, every command's (the one list the guards use: tl's
#: preflight before Hydra writes RUN/.hydra, and each command before it writes); any of them
#: there means the dir holds an earlier run.
RUN_OUTPUTS = (
    # tl train / finetune / distill / zeroshot
    "checkpoints/best.ckpt",
    "checkpoints/last.ckpt",
    "checkpoints/zeroshot.ckpt",
    "metrics.json",
    "report.md",
    "curves.png",
    "lr_find.png",
    "domains.png",
    "disentangle.png",
    "csv/metrics.csv",  # the default logger (Lightning's CSVLogger)
    "csv/hparams.yaml",
    # tl eval
    "eval.json",
    "confusion_matrix.png",
    "misclassified.csv",
    "top_losses.png",
    # tl predict, tl export (default names), tl fewshot, tl pretrain
    "predictions.csv",
    "predictions.json",
    "model.onnx",
    "model.pt",
    "model.safetensors",
    "model.json",
    "fewshot.json",
    "backbone.safetensors",
    "pretrain.json",
    "pretrain_curves.png",
    # a failed job of a sweep
    "failed.json",
)
#: What a sweep leaves in its sweep dir (besides its numbered job dirs).
SWEEP_OUTPUTS = ("summary.csv", "summary.md")

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------- checks


def _file_id(p: PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(p)  # follows symlinks: a link to an input is that input
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_output(
    path: PathLike,
    *,
    overwrite: bool,
    inputs: Iterable[PathLike] = (),
    key: str = "output",
    label: str | None = None,
) -> Path:
    """Refuse to write ``path`` over an input (always) or over an existing file (without overwrite).

    Args:
        path: the file about to be written.
        overwrite: the user's ``overwrite=true``.
        inputs: the run's input files (checkpoint, images, dataset files).
        key: the config key the path came from, for the message.
        label: how the message names the file (default ``key=path``).
    """
    path = Path(path)
    name = label or f"{key}={path}"
    if path.is_dir():
        raise TLError(f"{name} is a folder; name a file, or end {key} with / for the default name")
    if not os.path.lexists(path):
        return path
    target = _file_id(path)
    if target is not None:
        for inp in inputs:
            if _file_id(inp) == target:
                raise TLError(
                    f"{name} would overwrite {inp}, one of this run's inputs (the same file); choose another {key}"
                )
    if not overwrite:
        raise TLError(
            f"{name} already exists; pass overwrite=true to replace it, or choose another {key}"
        )
    return path


# --------------------------------------------------------------------------- atomic writes


def fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened/fsynced
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_error(path: Path, e: OSError) -> TLError:
    why = e.strerror or str(e) or type(e).__name__
    code = f" (errno {e.errno})" if e.errno else ""
    kept = " the previous file is unchanged" if path.exists() else " nothing was written"
    return TLError(f"could not write {path}: {why}{code};{kept}", exit_code=EXIT_FAILED)


@contextlib.contextmanager
def _staged(path: PathLike, keep_suffix: bool) -> Iterator[tuple[int, Path]]:
    """(open fd, temp path) beside ``path``; on success the temp file is fsynced and renamed onto it."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            prefix=f".{path.name}.",
            suffix=TMP_SUFFIX + (path.suffix if keep_suffix else ""),
            dir=path.parent,
        )
        tmp = Path(name)
        try:
            mode = os.stat(path).st_mode & 0o777  # overwrite=true: keep the file's permissions
        except OSError:
            mode = 0o666 & ~umask()  # mkstemp makes 0600; give a new file the usual mode
        os.fchmod(fd, mode)
        yield fd, tmp
        # a writer that recreates the file by name (safetensors does) leaves it 0600
        os.chmod(tmp, mode)
        fd2 = os.open(tmp, os.O_RDONLY)  # the writer may have reopened the file by name
        try:
            os.fsync(fd2)
        finally:
            os.close(fd2)
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except OSError as e:
        raise _write_error(path, e) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: PathLike, *, keep_suffix: bool = True) -> Iterator[Path]:
    """A temp path beside ``path`` for writers that take a file name (savefig, torch.onnx.export).

    The temp name ends in the target's suffix (``.model.x1y2.tmp.onnx``) for writers that pick the
    format from it. On success it is fsynced and renamed onto ``path``; on failure it is removed.
    """
    with _staged(path, keep_suffix) as (fd, tmp):
        os.close(fd)
        yield tmp


@contextlib.contextmanager
def atomic_file(
    path: PathLike, mode: str = "wb", *, keep_suffix: bool = True, **kw: Any
) -> Iterator[IO[Any]]:
    """An open file object on a temp file beside ``path``; renamed onto ``path`` when the block ends."""
    with _staged(path, keep_suffix) as (fd, _), os.fdopen(fd, mode, **kw) as f:
        yield f
        f.flush()


def _write_file(f: IO[bytes], data: bytes) -> None:
    """Write ``data`` to ``f`` (a seam for fault-injection tests)."""
    f.write(data)


def write_bytes(path: PathLike, data: bytes) -> Path:
    with atomic_file(path) as f:
        _write_file(f, data)
    return Path(path)


def write_text(path: PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def strict_json(obj: Any) -> tuple[Any, list[str]]:
    """``obj`` with every NaN/inf float replaced by None, and the keys (dotted paths) that were."""
    bad: list[str] = []

    def walk(v: Any, where: str) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            bad.append(where or "<value>")
            return None
        if isinstance(v, dict):
            return {k: walk(x, f"{where}.{k}" if where else str(k)) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [walk(x, f"{where}[{i}]") for i, x in enumerate(v)]
        return v

    return walk(obj, ""), bad


def dumps(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text: non-finite numbers are ``null``, listed in a top-level ``"nonfinite"``."""
    clean, bad = strict_json(obj)
    if bad and isinstance(clean, dict):
        clean["nonfinite"] = sorted(set(bad) | set(clean.get("nonfinite") or []))
    return json.dumps(clean, indent=indent, allow_nan=False) + "\n"


def write_json(path: PathLike, obj: Any) -> Path:
    return write_text(path, dumps(obj))


# --------------------------------------------------------------------------- run dirs

#: run dir (resolved) -> (fd of its .tl.lock, the lock file's path); at most one per process
_HELD: dict[str, tuple[int, Path]] = {}
#: every run dir this process has locked (its outputs there are this process's own)
CLAIMED: set[str] = set()


def _rank_zero() -> bool:
    return all(os.environ.get(v, "0") in ("", "0") for v in ("LOCAL_RANK", "NODE_RANK", "RANK"))


def _holder(lock: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = lock.read_text().strip()
        if pid:
            return f" (pid {int(pid)})"
    return ""


def lock_run_dir(out: PathLike) -> Path:
    """Take the run dir's lock (``out/.tl.lock``, ``flock``, non-blocking) for this process.

    Held until `release_run_dir` (or the process ends); a lock this process still holds from an
    earlier run in another dir is let go first. A second process gets one line naming the holder.
    """
    out = Path(out)
    key = str(out.resolve())
    if key in _HELD:
        return _HELD[key][1]
    release_run_dir()  # an earlier in-process run that stopped with an error
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(out, e) from None
    lock = out / LOCK_NAME
    for _ in range(10):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
        except OSError as e:
            raise _write_error(lock, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise TLError(
                    f"{out} is in use by another tl run{_holder(lock)}; wait for it to finish, or choose another hydra.run.dir"
                ) from None
            raise
        # the holder may have removed the file between our open and flock: lock the current one
        if _file_id(lock) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            _HELD[key] = (fd, lock)
            CLAIMED.add(key)
            return lock
        os.close(fd)
    raise TLError(f"{out}: could not lock {lock} (it keeps changing)")


def release_run_dir(out: PathLike | None = None) -> None:
    """Let go of the lock on ``out`` (every lock this process holds when None) and remove the file."""
    keys = list(_HELD) if out is None else [str(Path(out).resolve())]
    for key in keys:
        held = _HELD.pop(key, None)
        if held is None:
            continue
        fd, lock = held
        with contextlib.suppress(OSError):
            lock.unlink()  # while still locked: a waiter re-checks the inode after its flock
        with contextlib.suppress(OSError):
            os.close(fd)


def earlier_outputs(out: PathLike, names: Iterable[str] = RUN_OUTPUTS) -> list[Path]:
    out = Path(out)
    return [out / n for n in names if os.path.lexists(out / n)]


#: run dir (resolved) -> (overwrite, resume_from): checked, to be locked once the run creates it
_PENDING: dict[str, tuple[bool, PathLike | None]] = {}


def refuse_earlier_run(
    out: PathLike,
    overwrite: bool,
    resume_from: PathLike | None = None,
    key: str = "hydra.run.dir",
) -> None:
    """Refuse a run dir holding an earlier run's outputs (``RUN_OUTPUTS``), unless ``overwrite``
    or this run resumes from a checkpoint in it."""
    out = Path(out)
    found = earlier_outputs(out)
    if found and not overwrite:
        resuming_here = bool(resume_from) and (
            Path(os.path.expanduser(str(resume_from))).resolve().parent
            == (out / "checkpoints").resolve()
        )
        if not resuming_here:
            raise TLError(
                f"{found[0]} already exists: choose another {key}, or pass overwrite=true to replace it"
            )


def refuse_earlier_sweep(sweep_dir: PathLike, overwrite: bool) -> None:
    """Refuse a sweep dir holding an earlier sweep (its summary, or a job dir with outputs)."""
    d = Path(sweep_dir)
    if overwrite or not d.is_dir():
        return
    found = earlier_outputs(d, SWEEP_OUTPUTS)
    for job in sorted(p for p in d.iterdir() if p.is_dir() and p.name.isdigit()):
        found += earlier_outputs(job)
    if found:
        raise TLError(
            f"{found[0]} already exists (an earlier sweep): choose another hydra.sweep.dir, or "
            "pass overwrite=true to replace its runs"
        )


def claim_run_dir(
    out: PathLike,
    *,
    overwrite: bool,
    resume_from: PathLike | None = None,
    create: bool = True,
) -> None:
    """Refuse a run dir holding an earlier run's outputs, then lock it for this run.

    Allowed anyway: ``overwrite=true``, or resuming from a checkpoint in ``out/checkpoints``.
    ``create=False``: a dir that does not exist yet is not created here (a run that fails before
    any work leaves nothing behind); `claim_pending` locks it when training starts, checking again.
    Ranks other than 0 of a multi-process run neither check nor lock (rank 0 did, and holds it).
    """
    if not _rank_zero():
        return
    out = Path(out)
    if out.is_dir() and str(out.resolve()) in _HELD:
        return  # this run holds it already: what is there is its own (tl zeroshot scores its ckpt)
    refuse_earlier_run(out, overwrite, resume_from)
    if not create and not out.is_dir():
        _PENDING.clear()
        _PENDING[str(out.resolve())] = (overwrite, resume_from)
        return
    lock_run_dir(out)


def claim_pending(out: PathLike) -> None:
    """Lock a run dir that `claim_run_dir` (``create=False``) checked but did not lock yet."""
    if not _rank_zero():
        return
    out = Path(out)
    key = str(out.resolve())
    if key in _HELD or key not in _PENDING:
        return
    overwrite, resume_from = _PENDING.pop(key)
    lock_run_dir(out)
    try:  # another run may have written here since the first check
        refuse_earlier_run(out, overwrite, resume_from)
    except TLError:
        release_run_dir(out)
        raise


def inside_run_dir(path: Path, out_dir: Path) -> None:
    if path.is_symlink() or not path.resolve().is_relative_to(out_dir.resolve()):
        raise TLError(
            f"{path} points outside the run dir {out_dir}; pass output=PATH to write elsewhere"
        )


def output_path(cfg: Any, default_name: str, protect: list[str]) -> Path:
    """Where to write: ``output`` as given (a folder, or a path ending in /, gets ``default_name``),
    else the run dir.

    The default stays inside the run dir (a symlink there that points elsewhere is refused). An
    existing file is refused unless ``overwrite=true``, and one of ``protect`` (the checkpoint, the
    inputs; the same file by device and inode) always: see `tl_cli.core.outputs.check_output`.
    """
    out_dir = Path(str(cfg.output_dir))
    given = cfg.get("output")
    if given:
        raw = os.path.expanduser(str(given))
        path = Path(raw)
        if raw.endswith(("/", os.sep)) or path.is_dir():
            if os.path.lexists(path) and not path.is_dir():
                raise TLError(f"output={given}: {path} exists and is not a folder")
            path = path / default_name  # a folder (created when written): the default name in it
    else:
        path = out_dir / default_name
        inside_run_dir(path, out_dir)
    return check_output(path, overwrite=bool(cfg.get("overwrite", False)), inputs=protect)


#: what Hydra writes into every run dir before a command starts (its config record, the log)
HYDRA_RECORD = frozenset({"config.yaml", "hydra.yaml", "overrides.yaml"})


def discard_if_untouched(
    out: PathLike, job: str, since: float, existed: PathLike | None = None
) -> bool:
    """Remove a run dir that holds nothing but what Hydra wrote when this process started it
    (``.hydra/`` and ``<job>.log``): a command that failed before writing, or one whose output
    went elsewhere (``tl predict output=preds.csv``), leaves no empty run dir behind.

    Only a dir whose every entry is one of those, each written at or after ``since`` (this
    process's start), is removed: a dir holding anything else, or older, is left as it is. Then
    the folders above it that are now empty, up to ``existed`` (the deepest one that was there
    before the command started; not removed), go too. Returns whether the run dir was removed.
    """
    import shutil

    d = Path(out)
    try:
        entries = list(d.iterdir())
        record = d / ".hydra"
        names = {e.name for e in entries}
        if not names <= {".hydra", f"{job}.log", LOCK_NAME}:
            return False
        files = [e for e in entries if e.is_file()]
        if record.exists():
            if not record.is_dir() or not {e.name for e in record.iterdir()} <= HYDRA_RECORD:
                return False
            files += list(record.iterdir())
        if any(f.is_symlink() or not f.is_file() or f.stat().st_mtime < since for f in files):
            return False
        shutil.rmtree(d)
    except OSError:
        return False
    if existed is not None:
        stop = Path(existed).resolve()
        parent = d.resolve().parent
        while parent != stop and stop in parent.parents:
            try:
                parent.rmdir()  # only when empty
            except OSError:
                break
            parent = parent.parent
    return True

"""User-facing errors: one clear line, a non-zero exit code, no traceback."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

#: Exit code for bad input (paths, data layout, config values, checkpoints).
EXIT_BAD_INPUT = 2
#: Exit code for a run that completed but failed a gate, or failed for another reason.
EXIT_FAILED = 1


class TLError(Exception):
    """An error caused by the user's input or environment, reported as one line.

    Args:
        message: the line to print; it should name the file or value at fault.
        exit_code: process exit code (2 for bad input by default).
    """

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def full_errors() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def report_errors(fn: F) -> F:
    """Wrap a Hydra task so failures print one line instead of a traceback.

    Hydra's own handler prints a (trimmed) traceback for any exception, so the task catches
    first. `HYDRA_FULL_ERROR=1` lets everything through unchanged for debugging.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if full_errors():
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except TLError as e:
            _log(f"tl: error: {one_line(e)}")
            print(f"tl: error: {one_line(e)}", file=sys.stderr)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            print("tl: interrupted", file=sys.stderr)
            sys.exit(130)
        except (SystemExit, GeneratorExit):
            raise
        except BaseException as e:  # noqa: BLE001 - last line of defence for unexpected errors
            # (BaseException: a Rust extension's panic, pyo3's PanicException, is not an Exception)
            root = root_cause(e)
            if isinstance(root, TLError):
                _log(f"tl: error: {one_line(root)}")
                print(f"tl: error: {one_line(root)}", file=sys.stderr)
                sys.exit(root.exit_code)
            line = f"tl: error: {describe(e)} (set HYDRA_FULL_ERROR=1 for the traceback)"
            _log(line)
            print(line, file=sys.stderr)
            sys.exit(EXIT_FAILED)

    return wrapper  # type: ignore[return-value]


def one_line(e: BaseException) -> str:
    """A TLError's line. One raised in a DataLoader worker comes back re-raised by PyTorch as
    ``Caught TLError in DataLoader worker process 0.\nOriginal Traceback ...\n...TLError: <line>``:
    the line, without the worker's traceback."""
    msg = str(e)
    if "\nOriginal Traceback" not in msg:
        return msg
    last = [ln for ln in msg.splitlines() if ln.strip()][-1].strip()
    return last.split("TLError: ", 1)[1] if "TLError: " in last else last


def root_cause(e: BaseException) -> BaseException:
    """The innermost ``__cause__`` (Hydra's InstantiationException wraps the real error)."""
    seen = {id(e)}
    while e.__cause__ is not None and id(e.__cause__) not in seen:
        e = e.__cause__
        seen.add(id(e))
    return e


def describe(e: BaseException, limit: int = 400) -> str:
    """``Type: reason`` on one line: the root cause's message, every line of it, not the first.

    Hydra's ``InstantiationException`` puts "Error in call to target ..." on the first line and the
    reason on the next ones (and in ``__cause__``).
    """
    root = root_cause(e)
    lines = [
        ln.strip()
        for ln in str(root).strip().splitlines()
        if ln.strip() and not ln.strip().startswith(("full_key:", "object_type="))
    ]
    if root is e and len(lines) > 1 and lines[0].startswith("Error in call to target"):
        lines = lines[1:]
    msg = " ".join(lines)
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return f"{type(root).__name__}: {msg}" if msg else type(root).__name__


def log_line(text: str, level: int = 20) -> None:
    """Write console text to the run's log file (train.log, eval.log, ...), not to the console.

    Hydra's job logging gives the root logger a file handler in the run dir; the ``tl.console``
    logger uses only the file handlers (the console already has the text), refreshed per call
    because each job of a multirun gets its own file.
    """
    import logging

    lg = logging.getLogger("tl.console")
    lg.propagate = False
    lg.setLevel(logging.DEBUG)
    lg.handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    if lg.handlers:
        lg.log(level, text)


def _log(line: str) -> None:
    log_line(line, 40)

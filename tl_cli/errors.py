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
            print(f"tl: error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            print("tl: interrupted", file=sys.stderr)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - last line of defence for unexpected errors
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            print(
                f"tl: error: {type(e).__name__}: {msg} (set HYDRA_FULL_ERROR=1 for the traceback)",
                file=sys.stderr,
            )
            sys.exit(EXIT_FAILED)

    return wrapper  # type: ignore[return-value]

"""Checks of a dataset's files that need no torch, by ``dataset.name``: run by `tl_cli.run.early`
before a command imports torch, so a data file's mistake (a CSV without its label column) is one
line in about a second. Each check is the data module's own (the same function it reads with);
the modules that register them are plain Python and are imported on the first query.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

#: dataset.name -> check(dataset config as a dict), raising the data module's own TLError
CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {}
#: torch-free modules that register checks (a fixed list, imported by name on the first query)
_PROVIDERS = ("tl_cli.modalities.text.files",)


def check_dataset(dataset: dict[str, Any]) -> None:
    """Run the torch-free check registered for ``dataset['name']``, if any."""
    for m in _PROVIDERS:
        importlib.import_module(m)
    check = CHECKS.get(str(dataset.get("name")))
    if check is not None:
        check(dataset)

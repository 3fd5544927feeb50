"""One tiny trained run shared by the predict/export/gates/report tests (trained once per session).

lr 0.05 for 4 epochs: the 3-colour tiny data is learned (test accuracy 1.0), so predictions and
confusion matrices have something to show. Tests must not write into the returned run dir.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import open_dict

from .conftest import TINY, compose_cfg

LEARN = ["optimizer.lr=0.05", "trainer.max_epochs=4"]
_RUNS: dict[str, tuple[Path, dict]] = {}


def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> tuple[Path, dict]:
    """(run dir, metrics) of a tiny run on ``tiny_data``."""
    key = str(tiny_data)
    if key not in _RUNS:
        from tl_cli.commands import train

        out = tmp_path_factory.mktemp("trained") / "run"
        cfg = compose_cfg([*TINY, f"dataset.root={tiny_data}", *LEARN])
        with open_dict(cfg):
            cfg.output_dir = str(out)
        _RUNS[key] = (out, train.run(cfg))
    return _RUNS[key]

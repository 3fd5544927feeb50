"""Import every module that registers components, so each registry is complete.

Registries (``TASKS``, backbone ``SOURCES``, ``HEADS``, ``STRATEGIES``, ``OPTIMIZERS``,
``DATASETS``) are filled when their modules are imported. Commands and checkpoint loading import
this module first. A new modality or task adds its module here (one line).
"""

from __future__ import annotations

from tl_cli import (  # noqa: F401
    adapt,
    audio,
    backbones,
    data,
    fewshot,
    heads,
    modalities,
    optimizers,
    speech,
    strategies,
    tasks,
    text,
    zeroshot,
)

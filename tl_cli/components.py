"""Import every module that registers components, so each registry is complete.

Registries (``TASKS``, backbone ``SOURCES``, ``HEADS``, ``STRATEGIES``, ``OPTIMIZERS``,
``DATASETS``, ``MODALITIES``) are filled when their modules are imported. Commands and checkpoint
loading import this module first. A new modality or task adds its module here (one line).
"""

from __future__ import annotations

import tl_cli.commands.fewshot  # noqa: F401
import tl_cli.commands.zeroshot  # noqa: F401
import tl_cli.data.base  # noqa: F401
import tl_cli.modalities.audio.backbone  # noqa: F401
import tl_cli.modalities.audio.data  # noqa: F401
import tl_cli.modalities.backbones  # noqa: F401
import tl_cli.modalities.base  # noqa: F401
import tl_cli.modalities.text.backbone  # noqa: F401
import tl_cli.tasks.base  # noqa: F401
import tl_cli.tasks.classification  # noqa: F401
import tl_cli.transfer.adapt  # noqa: F401
import tl_cli.transfer.heads  # noqa: F401
import tl_cli.transfer.optimizers  # noqa: F401
import tl_cli.transfer.strategies  # noqa: F401

"""Import every module that registers components, so each registry is complete.

Registries (``TASKS``, backbone ``SOURCES``, ``HEADS``, ``STRATEGIES``, ``OPTIMIZERS``,
``DATASETS``, ``MODALITIES``, ``ADAPTERS``) are filled when their modules are imported. Checkpoint
loading, config validation and the commands import this module first. It sits at the top of the
layers it imports (tasks), so a lower layer never needs it. A new modality, task or transfer
method adds its module here (one line).
"""

from __future__ import annotations

import tl_cli.modalities.audio.backbone  # noqa: F401
import tl_cli.modalities.audio.data  # noqa: F401
import tl_cli.modalities.audio.modality  # noqa: F401
import tl_cli.modalities.image.backbones  # noqa: F401
import tl_cli.modalities.image.data  # noqa: F401
import tl_cli.modalities.image.modality  # noqa: F401
import tl_cli.modalities.text.backbone  # noqa: F401
import tl_cli.modalities.text.data  # noqa: F401
import tl_cli.modalities.text.modality  # noqa: F401
import tl_cli.tasks.classification  # noqa: F401
import tl_cli.tasks.detection.task  # noqa: F401
import tl_cli.tasks.distill  # noqa: F401
import tl_cli.tasks.ner.data  # noqa: F401
import tl_cli.tasks.ner.distill  # noqa: F401
import tl_cli.tasks.ner.task  # noqa: F401
import tl_cli.transfer.adapt  # noqa: F401
import tl_cli.transfer.dsn  # noqa: F401
import tl_cli.transfer.heads  # noqa: F401
import tl_cli.transfer.optimizers  # noqa: F401
import tl_cli.transfer.prototypes  # noqa: F401
import tl_cli.transfer.strategies  # noqa: F401
import tl_cli.transfer.zeroshot  # noqa: F401

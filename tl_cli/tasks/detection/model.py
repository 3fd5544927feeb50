"""The detector: a registry backbone's multi-scale maps -> feature pyramid -> a torchvision head.

``head=fcos|retinanet|fasterrcnn`` picks torchvision's ``FCOS``, ``RetinaNet`` or ``FasterRCNN``;
they take any ``backbone`` module with ``out_channels`` that returns an ordered dict of maps.
tl's :class:`Neck` is that module, shaped like torchvision's ``BackboneWithFPN`` (``body`` +
``fpn``), so a COCO-pretrained torchvision detector (``backbone=fasterrcnn_resnet50_fpn``,
network needed) fits the same code: only its box predictor is replaced.

:class:`Detector` splits torchvision's ``forward`` at the body: ``body_features`` (the
pretrained backbone, the expensive part) and ``losses``/``detect`` (pyramid + head, from body
maps). A frozen backbone's maps are then computed once and cached (``cache.py``), and the
pyramid and head train on them; the full ``forward`` still runs images end to end.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from tl_cli.core.errors import TLError

HEADS = ("fcos", "retinanet", "fasterrcnn")
#: torchvision COCO detectors a user with network may start from (head kind per name)
COCO_DETECTORS = {
    "fasterrcnn_resnet50_fpn": "fasterrcnn",
    "fasterrcnn_resnet50_fpn_v2": "fasterrcnn",
    "fasterrcnn_mobilenet_v3_large_fpn": "fasterrcnn",
    "fasterrcnn_mobilenet_v3_large_320_fpn": "fasterrcnn",
    "retinanet_resnet50_fpn": "retinanet",
    "retinanet_resnet50_fpn_v2": "retinanet",
    "fcos_resnet50_fpn": "fcos",
}
#: output strides of the backbone maps the pyramid reads (C3, C4, C5)
STRIDES = (8, 16, 32)


class MultiScaleFeatures(nn.Module):
    # (see __init__: the backbone is a submodule, or held by reference when a task owns it)
    """A tl :class:`~tl_cli.modalities.backbones.Backbone` as an ordered dict of feature maps.

    timm models (the bundled EfficientNet-Lite included) use timm's ``forward_intermediates``
    (stops after the deepest wanted stage). torchvision CNNs are probed once: forward hooks on
    their stage modules find the last stage at each stride. A model with no spatial maps (ViT)
    is refused: detection needs a convolutional backbone.

    Args:
        backbone: a registry backbone (classifier already removed).
        strides: the output strides to return (ascending).
    """

    def __init__(
        self, backbone: nn.Module, strides: tuple[int, ...] = STRIDES, register: bool = True
    ) -> None:
        super().__init__()
        if register:
            self.backbone = backbone
        else:  # the task owns it as ``task.backbone`` (the transfer policy's); not registered twice
            self._unregistered = [backbone]
        self.strides = tuple(int(s) for s in strides)
        model = backbone.model
        self._hooks: list[Any] = []
        if hasattr(model, "forward_intermediates") and hasattr(model, "feature_info"):
            info = list(model.feature_info)
            last = {int(f["reduction"]): i for i, f in enumerate(info)}
            missing = [s for s in self.strides if s not in last]
            if missing:
                raise TLError(
                    f"backbone {backbone.name}: no feature map at stride {missing[0]}; "
                    "detection needs a convolutional backbone with strides 8, 16 and 32"
                )
            self.kind = "timm"
            self.indices = [last[s] for s in self.strides]
            self.out_channels = [int(info[i]["num_chs"]) for i in self.indices]
            first_deep = next(f["module"] for f in info if int(f["reduction"]) >= self.strides[0])
        else:
            self.kind = "hooks"
            self.names, self.out_channels, first_deep = _probe_stages(
                model, self.strides, backbone.name
            )
        #: the stage where the first returned stride starts: everything before it is "early"
        self.first_deep = str(first_deep)

    @property
    def tl_backbone(self) -> nn.Module:
        return self.backbone if "backbone" in self._modules else self._unregistered[0]

    def early_parameters(self) -> list[nn.Parameter]:
        """The stem and the stride-2/4 stages: the parameters before the first returned stage.

        Fine-tuning keeps them frozen, as torchvision's detectors do by default
        (``trainable_backbone_layers=3``) and Detectron2 does (``FREEZE_AT=2``): generic edges
        and textures transfer as they are, a few hundred images cannot improve them, and their
        high-resolution backward pass is the most expensive part of a CPU step.
        """
        out = []
        prefix = self.first_deep + "."
        for n, p in self.tl_backbone.model.named_parameters():
            if n.startswith(prefix):
                break
            out.append(p)
        return out

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        model = self.tl_backbone.model
        if self.kind == "timm":
            maps = model.forward_intermediates(
                x, indices=self.indices, intermediates_only=True, stop_early=True
            )
        else:
            got: dict[str, Tensor] = {}
            handles = [
                model.get_submodule(n).register_forward_hook(
                    lambda _m, _i, out, n=n: got.__setitem__(n, out)
                )
                for n in self.names
            ]
            try:
                model(x)
            finally:
                for h in handles:
                    h.remove()
            maps = [got[n] for n in self.names]
        return OrderedDict((str(i), m) for i, m in enumerate(maps))


def _probe_stages(
    model: nn.Module, strides: tuple[int, ...], name: str
) -> tuple[list[str], list[int], str]:
    """Names and widths of the last stage module at each stride, and the first stage module at
    the first stride, found by one small forward."""
    children = dict(model.named_children())
    if isinstance(children.get("features"), nn.Sequential):
        cands = [f"features.{i}" for i in range(len(children["features"]))]
    else:
        cands = [n for n, c in children.items() if any(True for _ in c.parameters())]
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(
            lambda _m, _i, out, n=n: (
                shapes.__setitem__(n, tuple(out.shape)) if isinstance(out, Tensor) else None
            )
        )
        for n in cands
    ]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, 128, 128))
    except (AssertionError, RuntimeError, ValueError):  # fixed-size models (ViT) refuse 128 px
        shapes = {}
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    last: dict[int, str] = {}
    first: dict[int, str] = {}
    for n in cands:
        s = shapes.get(n)
        if s is not None and len(s) == 4 and s[-1] > 0:
            last[128 // s[-1]] = n
            first.setdefault(128 // s[-1], n)
    missing = [s for s in strides if s not in last]
    if missing:
        raise TLError(
            f"backbone {name}: no feature map at stride {missing[0]}; detection needs a "
            "convolutional backbone with strides 8, 16 and 32 (e.g. efficientnet_lite0, resnet50)"
        )
    names = [last[s] for s in strides]
    return names, [int(shapes[n][1]) for n in names], first[strides[0]]


class Neck(nn.Module):
    """``body`` (multi-scale maps) + ``fpn``, the layout of torchvision's ``BackboneWithFPN``."""

    def __init__(self, body: nn.Module, fpn: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.out_channels = int(out_channels)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body(x))


def freeze_bn(module: nn.Module) -> nn.Module:
    """BatchNorm -> FrozenBatchNorm (fixed statistics and affine), the detection norm: batches
    of 2-8 images give batch statistics too noisy to train on (timm's converter covers timm's
    BatchNormAct2d and torch's BatchNorm2d)."""
    from timm.layers import freeze_batch_norm_2d

    return freeze_batch_norm_2d(module)


def build_torchvision_head(
    head: str,
    neck: Neck,
    num_classes: int,
    image_size: int,
    mean: list[float],
    std: list[float],
    head_convs: int = 4,
) -> nn.Module:
    """A torchvision detector on ``neck``; ``num_classes`` includes background (index 0).

    The transform resizes to ``image_size`` on the long side (torchvision's 800 default costs
    several times more on a CPU), and the score threshold is COCO's 0.05 so that mAP sees the
    whole precision-recall curve (predict applies the user's ``score_threshold`` later).
    """
    common = dict(
        min_size=image_size, max_size=image_size, image_mean=list(mean), image_std=list(std)
    )
    levels = len(STRIDES) + (2 if head in ("fcos", "retinanet") else 1)
    strides = [*STRIDES, *(STRIDES[-1] * 2 ** (i + 1) for i in range(levels - len(STRIDES)))]
    if head == "fcos":
        from torchvision.models.detection.fcos import FCOSHead

        anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * levels)
        return FCOS(
            neck,
            num_classes,
            anchor_generator=anchors,
            head=FCOSHead(neck.out_channels, 1, num_classes, num_convs=head_convs),
            score_thresh=0.05,
            detections_per_img=100,
            **common,
        )
    if head == "retinanet":
        # RetinaNet's anchors: 4x the stride, three scales per octave, three aspect ratios
        sizes = tuple(tuple(int(4 * s * 2 ** (k / 3)) for k in range(3)) for s in strides)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * levels)
        return RetinaNet(
            neck, num_classes, anchor_generator=anchors, detections_per_img=100, **common
        )
    if head == "fasterrcnn":
        sizes = tuple((4 * s,) for s in strides)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * levels)
        roi = MultiScaleRoIAlign([str(i) for i in range(len(STRIDES))], 7, 2)
        return FasterRCNN(
            neck,
            num_classes,
            rpn_anchor_generator=anchors,
            box_roi_pool=roi,
            box_score_thresh=0.05,
            box_detections_per_img=100,
            **common,
        )
    raise TLError(f"head={head!r} must be one of {', '.join(HEADS)}")


class Detector(nn.Module):
    """A torchvision detector whose backbone is split into ``body`` and the rest.

    Labels are 1..C (0 = background) for every head. ``losses``/``detect`` take the body's
    maps so that cached maps (frozen backbone) and live ones (fine-tuning) share one path.

    Args:
        det: a torchvision FCOS / RetinaNet / FasterRCNN whose ``backbone`` has ``body``/``fpn``.
        head: fcos | retinanet | fasterrcnn.
        class_names: index -> name (label = index + 1).
        preprocessing: ``image_size``, ``mean``, ``std`` (plain values, for checkpoints/export).
        backbone: the tl Backbone inside the body (None for a COCO torchvision detector).
    """

    def __init__(
        self,
        det: nn.Module,
        head: str,
        class_names: list[str],
        preprocessing: dict[str, Any],
        backbone: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.det = det
        self.head_name = head
        self.class_names = list(class_names)
        self.preprocessing = dict(preprocessing)
        self.tl_backbone = [backbone]  # a list: not registered twice as a submodule
        #: stride of the body's first map: padded batch size = its size x this
        self.first_stride = _first_stride(det.backbone.body)

    # ------------------------------------------------------------------ parts
    @property
    def body(self) -> nn.Module:
        return self.det.backbone.body

    def body_parameters(self) -> list[nn.Parameter]:
        return list(self.body.parameters())

    def early_parameters(self) -> list[nn.Parameter]:
        """Body parameters that stay frozen when fine-tuning (stem and stride-2/4 stages)."""
        body = self.body
        if isinstance(body, MultiScaleFeatures):
            return body.early_parameters()
        # a torchvision detector's body (IntermediateLayerGetter): the children before the
        # first returned layer
        out: list[nn.Parameter] = []
        first = next(iter(getattr(body, "return_layers", {}) or {}), None)
        for n, c in body.named_children():
            if n == first:
                break
            out.extend(c.parameters())
        return out

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything that is new: pyramid, detection head (and RPN)."""
        body = {id(p) for p in self.body.parameters()}
        return [p for p in self.det.parameters() if id(p) not in body]

    def block_groups(self) -> list[list[nn.Parameter]]:
        """The body's parameters in block groups, stem first (for freeze schedules / LR decay)."""
        bb = self.tl_backbone[0]
        named = dict(self.body.named_parameters())
        if bb is not None:
            groups = [
                [named["backbone." + n] for n in g if "backbone." + n in named]
                for g in bb.block_groups()
            ]
        else:
            groups = [list(c.parameters()) for c in self.body.children()]
        return [g for g in groups if g]

    # ------------------------------------------------------------------ forward pieces
    def body_maps(
        self, images: list[Tensor]
    ) -> tuple[OrderedDict[str, Tensor], list[tuple[int, int]]]:
        """Resized float images -> the body's maps, batched, and the images' sizes.

        Each image is normalised and padded on its own to a multiple of 32, images of one padded
        shape go through the body together, and the maps are zero-padded to the batch's largest.
        A cached map (computed per image) and a live one are then the same numbers, so a head
        trained on the cache meets the same inputs at eval, predict and export.
        """
        t = self.det.transform
        sizes = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
        padded = [t.batch_images([t.normalize(img)], size_divisible=32)[0] for img in images]
        per_image: list[OrderedDict[str, Tensor] | None] = [None] * len(images)
        shapes: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(padded):
            shapes.setdefault(tuple(p.shape), []).append(i)
        for idx in shapes.values():
            maps = self.body(torch.stack([padded[i] for i in idx]))
            for j, i in enumerate(idx):
                per_image[i] = OrderedDict((k, v[j]) for k, v in maps.items())
        return pad_maps(per_image), sizes  # type: ignore[arg-type]

    def _pyramid(self, feats: OrderedDict[str, Tensor]) -> OrderedDict[str, Tensor]:
        return self.det.backbone.fpn(feats)

    def _image_list(
        self, feats: OrderedDict[str, Tensor], sizes: list[tuple[int, int]]
    ) -> ImageList:
        """An ImageList with the padded batch shape only (anchors need the shape, not pixels)."""
        first = next(iter(feats.values()))
        h, w = first.shape[-2] * self.first_stride, first.shape[-1] * self.first_stride
        return ImageList(first.new_empty((first.shape[0], 0, h, w)), sizes)

    def losses(
        self,
        feats: OrderedDict[str, Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """Training losses from body maps; ignored boxes (VOC difficult) are left out."""
        targets = [
            {"boxes": t["boxes"][~t["ignore"]], "labels": t["labels"][~t["ignore"]]}
            if "ignore" in t
            else t
            for t in targets
        ]
        pyr = self._pyramid(feats)
        images = self._image_list(feats, image_sizes)
        det = self.det
        if self.head_name == "fasterrcnn":
            proposals, rpn_losses = det.rpn(images, pyr, targets)
            _, roi_losses = det.roi_heads(pyr, proposals, images.image_sizes, targets)
            return {**rpn_losses, **roi_losses}
        levels = list(pyr.values())
        out = det.head(levels)
        anchors = det.anchor_generator(images, levels)
        if self.head_name == "fcos":
            return det.compute_loss(targets, out, anchors, [x.size(2) * x.size(3) for x in levels])
        return det.compute_loss(targets, out, anchors)

    def detect(
        self, feats: OrderedDict[str, Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Detections (boxes in the input images' pixels, scores, labels 1..C) from body maps."""
        pyr = self._pyramid(feats)
        images = self._image_list(feats, image_sizes)
        det = self.det
        if self.head_name == "fasterrcnn":
            proposals, _ = det.rpn(images, pyr)
            dets, _ = det.roi_heads(pyr, proposals, images.image_sizes)
            return dets
        levels = list(pyr.values())
        out = det.head(levels)
        anchors = det.anchor_generator(images, levels)
        per_level = [x.size(2) * x.size(3) for x in levels]
        if self.head_name == "retinanet":
            a = out["cls_logits"].size(1) // sum(per_level)
            per_level = [n * a for n in per_level]
        split_out = {k: list(v.split(per_level, dim=1)) for k, v in out.items()}
        split_anchors = [list(x.split(per_level)) for x in anchors]
        return det.postprocess_detections(split_out, split_anchors, images.image_sizes)

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Resized float images -> losses (with targets) or detections (without)."""
        feats, sizes = self.body_maps(images)
        if targets is not None:
            return self.losses(feats, sizes, targets)
        return self.detect(feats, sizes)


def pad_maps(maps: list[OrderedDict[str, Tensor]]) -> OrderedDict[str, Tensor]:
    """Per-image maps ``(C, h, w)`` -> a batch ``(B, C, H, W)``, zero-padded bottom/right."""
    out: OrderedDict[str, Tensor] = OrderedDict()
    for k in maps[0]:
        levels = [m[k] for m in maps]
        h = max(x.shape[-2] for x in levels)
        w = max(x.shape[-1] for x in levels)
        batch = levels[0].new_zeros((len(levels), levels[0].shape[0], h, w))
        for i, x in enumerate(levels):
            batch[i, :, : x.shape[-2], : x.shape[-1]].copy_(x)
        out[k] = batch
    return out


def _first_stride(body: nn.Module) -> int:
    if isinstance(body, MultiScaleFeatures):
        return body.strides[0]
    was = body.training
    body.eval()
    try:
        with torch.no_grad():
            first = next(iter(body(torch.zeros(1, 3, 64, 64)).values()))
    finally:
        body.train(was)
    return 64 // int(first.shape[-1])


def build_detector(
    backbone_cfg: dict[str, Any],
    class_names: list[str],
    head: str = "fcos",
    image_size: int = 512,
    fpn_channels: int = 128,
    head_convs: int = 4,
    pretrained: bool = True,
) -> Detector:
    """A detector by names: ``backbone_cfg`` is tl's backbone config (``name``, ``source``, ...).

    A torchvision COCO detector name (``COCO_DETECTORS``) starts from its COCO weights (a
    download; fails in seconds offline) and only the box predictor is replaced; ``head`` is then
    the detector's own.
    """
    name = str(backbone_cfg.get("name", ""))
    if head not in HEADS:
        raise TLError(f"head={head!r} must be one of {', '.join(HEADS)}")
    if int(fpn_channels) < 32 or int(fpn_channels) % 32:
        # FCOS's head normalises with GroupNorm(32 groups)
        raise TLError(f"fpn_channels={fpn_channels} must be a positive multiple of 32")
    if int(head_convs) < 1:
        raise TLError(f"head_convs={head_convs} must be >= 1")
    if name in COCO_DETECTORS:
        return _coco_detector(name, class_names, image_size, pretrained)
    from tl_cli.modalities.backbones import build_backbone

    backbone = build_backbone(backbone_cfg, pretrained=pretrained)
    backbone.model = freeze_bn(backbone.model)
    return detector_on(backbone, class_names, head, image_size, fpn_channels, head_convs)


def detector_on(
    backbone: nn.Module,
    class_names: list[str],
    head: str = "fcos",
    image_size: int = 512,
    fpn_channels: int = 128,
    head_convs: int = 4,
    register_backbone: bool = True,
) -> Detector:
    """Pyramid + torchvision head on a built tl backbone (``class_names``: objects only)."""
    if getattr(backbone, "modality", "image") != "image":
        raise TLError(f"backbone {backbone.name}: task=detection needs an image backbone")
    if head not in HEADS:
        raise TLError(f"head={head!r} must be one of {', '.join(HEADS)}")
    if int(fpn_channels) < 32 or int(fpn_channels) % 32:
        raise TLError(f"fpn_channels={fpn_channels} must be a positive multiple of 32")
    if int(head_convs) < 1:
        raise TLError(f"head_convs={head_convs} must be >= 1")
    body = MultiScaleFeatures(backbone, register=register_backbone)
    extra = (
        LastLevelP6P7(fpn_channels, fpn_channels) if head != "fasterrcnn" else LastLevelMaxPool()
    )
    fpn = FeaturePyramidNetwork(body.out_channels, fpn_channels, extra_blocks=extra)
    neck = Neck(body, fpn, fpn_channels)
    prep = backbone.preprocessing
    det = build_torchvision_head(
        head, neck, len(class_names) + 1, image_size, prep["mean"], prep["std"], head_convs
    )
    preprocessing = {
        "image_size": int(image_size),
        "mean": list(prep["mean"]),
        "std": list(prep["std"]),
    }
    return Detector(det, head, class_names, preprocessing, backbone)


def _coco_detector(
    name: str, class_names: list[str], image_size: int, pretrained: bool
) -> Detector:
    """A torchvision COCO detector with a new box predictor for ``class_names``."""
    from torchvision.models import get_model, get_model_weights

    from tl_cli.core import network

    head = COCO_DETECTORS[name]
    weights = get_model_weights(name).DEFAULT if pretrained else None
    if weights is not None:
        cache = (
            Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
        )
        if not cache.is_file():
            reason = network.probe(weights.url)
            if reason:
                raise network.offline_weights_error(
                    f"torchvision detector {name}", str(cache), reason
                )
    try:
        det = get_model(name, weights=weights, weights_backbone=None)
    except (OSError, RuntimeError) as e:
        raise TLError(
            f"cannot load torchvision detector {name}: {str(e).splitlines()[0]}"
        ) from None
    # torchvision freezes BatchNorm only when it loads weights: freeze it either way, so a
    # checkpoint rebuilt without weights has the same modules (and state dict keys)
    det.backbone.body = freeze_bn(det.backbone.body)
    n = len(class_names) + 1
    if head == "fasterrcnn":
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

        box = det.roi_heads.box_predictor
        det.roi_heads.box_predictor = FastRCNNPredictor(box.cls_score.in_features, n)
        det.roi_heads.score_thresh = 0.05
    elif head == "retinanet":
        from torchvision.models.detection.retinanet import RetinaNetClassificationHead

        old = det.head.classification_head
        det.head.classification_head = RetinaNetClassificationHead(
            det.backbone.out_channels, old.num_anchors, n
        )
    else:
        from torchvision.models.detection.fcos import FCOSClassificationHead

        old = det.head.classification_head
        det.head.classification_head = FCOSClassificationHead(
            det.backbone.out_channels, old.num_anchors, n, num_convs=len(old.conv) // 3
        )
        det.score_thresh = 0.05
    det.transform.min_size = (int(image_size),)
    det.transform.max_size = int(image_size)
    preprocessing = {
        "image_size": int(image_size),
        "mean": list(det.transform.image_mean),
        "std": list(det.transform.image_std),
    }
    return Detector(det, head, class_names, preprocessing, None)

"""``tl export`` for task=detection: a batch-free graph with one ``detections`` output.

torchvision's post-processing loops over the images of a batch (and over pyramid levels) in
Python, which tracing unrolls for the example's batch size. :class:`FCOSExport` does the same
work with batched tensor ops (decode, score, a top-k per image, one class- and image-aware NMS,
a top-K per image), so the ONNX graph takes any batch size:

* input ``image`` ``(B, 3, S, S)``: RGB resized so that the long side is ``S`` (the checkpoint's
  image size), normalised with its mean/std, zero-padded bottom/right to ``S x S`` (what tl
  itself feeds the backbone);
* output ``detections`` ``(B, K, 6)``: ``x1, y1, x2, y2`` in the input's pixels (divide by the
  resize factor for original pixels), ``score``, ``label`` (class index in ``class_names``; 0
  with score 0 on padding rows), best first, ``K = 100``.

It differs from torchvision's eager post-processing in one place: the 1000 candidates per image
are the top 1000 over all pyramid levels, not per level; the exported graph is checked against
itself in PyTorch by ``tl export``. FCOS only (RetinaNet and Faster R-CNN post-process through
anchors per location and a second stage).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import batched_nms

from tl_cli.core.errors import TLError


class FCOSExport(nn.Module):
    """Detector (FCOS head) -> ``detections (B, K, 6)`` with batched post-processing."""

    def __init__(self, detector: Any, k: int = 100, candidates: int = 1000) -> None:
        super().__init__()
        if detector.head_name != "fcos":
            raise TLError(
                f"tl export supports task=detection with head=fcos (this checkpoint: "
                f"head={detector.head_name})"
            )
        self.detector = detector
        det = detector.det
        self.k = int(k)
        self.candidates = int(candidates)
        self.score_thresh = float(det.score_thresh)
        self.nms_thresh = float(det.nms_thresh)

    def forward(self, image: Tensor) -> Tensor:
        det = self.detector.det
        b, _, h, w = image.shape
        levels = list(det.backbone.fpn(self.detector.body(image)).values())
        out = det.head(levels)
        anchors = det.anchor_generator(ImageList(image[:1], [(h, w)]), levels)[0]  # (N, 4)
        boxes = det.box_coder.decode(out["bbox_regression"], anchors)  # (B, N, 4)
        boxes = torch.stack(
            (
                boxes[..., 0].clamp(0, w),
                boxes[..., 1].clamp(0, h),
                boxes[..., 2].clamp(0, w),
                boxes[..., 3].clamp(0, h),
            ),
            -1,
        )
        scores = torch.sqrt(torch.sigmoid(out["cls_logits"]) * torch.sigmoid(out["bbox_ctrness"]))
        c = scores.shape[-1]
        flat = scores.flatten(1)  # (B, N * C)
        t = min(self.candidates, flat.shape[1])
        top, idx = flat.topk(t, dim=1)  # (B, T)
        labels = idx % c
        cand = torch.gather(boxes, 1, (idx // c).unsqueeze(-1).expand(-1, -1, 4))  # (B, T, 4)
        top = torch.where(top > self.score_thresh, top, torch.zeros_like(top))
        image_idx = torch.arange(b, device=image.device).unsqueeze(1).expand(-1, t)
        keep = batched_nms(
            cand.reshape(-1, 4),
            top.reshape(-1),
            (image_idx * c + labels).reshape(-1),
            self.nms_thresh,
        )
        kept = torch.zeros_like(top.reshape(-1)).index_put((keep,), top.reshape(-1)[keep])
        best, pos = kept.reshape(b, t).topk(min(self.k, t), dim=1)  # (B, K)
        sel_boxes = torch.gather(cand, 1, pos.unsqueeze(-1).expand(-1, -1, 4))
        sel_labels = torch.gather(labels, 1, pos).to(best.dtype)
        live = (best > 0).to(best.dtype)
        rows = torch.cat(
            (sel_boxes * live.unsqueeze(-1), best.unsqueeze(-1), (sel_labels * live).unsqueeze(-1)),
            -1,
        )
        if rows.shape[1] < self.k:  # fewer candidates than K (tiny inputs): pad with zero rows
            rows = torch.cat((rows, rows.new_zeros(b, self.k - rows.shape[1], 6)), 1)
        return rows

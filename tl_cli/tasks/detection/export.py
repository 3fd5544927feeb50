"""ONNX export of a detector: images in, a fixed number of boxes/scores/labels out.

The graph takes ``images`` ``(1, 3, H, W)``, RGB float in [0, 1], already resized so that the
long side is ``image_size`` (H and W dynamic). The batch is fixed at 1: torchvision's
post-processing loops over the images of a batch in Python, which tracing unrolls, so a
traced graph only holds for the batch size it saw (the sidecar says so). It
normalises, pads to a multiple of 32 (as tl does before the backbone), runs backbone,
pyramid, head and torchvision's post-processing (NMS included) and returns ``boxes``
``(1, K, 4)`` (pixels of the input), ``scores`` ``(1, K)`` and ``labels`` ``(1, K)`` (class
index + 1; 0 with score 0 pads an image's rows to ``K = detections_per_img``). The sidecar
JSON holds class names, image size, normalisation and these conventions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tl_cli.core.errors import TLError

#: opset with the ops torchvision's detection post-processing needs (NMS, RoIAlign)
OPSET = 17


class ExportWrapper(nn.Module):
    """Detector -> fixed-size outputs for ONNX (see the module docstring)."""

    def __init__(self, detector: Any, max_detections: int = 100) -> None:
        super().__init__()
        self.detector = detector
        prep = detector.preprocessing
        self.register_buffer("mean", torch.tensor(prep["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(prep["std"]).view(1, 3, 1, 1))
        self.k = int(max_detections)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h, w = images.shape[-2], images.shape[-1]
        x = (images - self.mean) / self.std
        ph = (32 - h % 32) % 32
        pw = (32 - w % 32) % 32
        x = F.pad(x, [0, pw, 0, ph])
        feats = self.detector.body(x)
        sizes = [(h, w)] * images.shape[0]
        dets = self.detector.detect(feats, sizes)
        boxes, scores, labels = [], [], []
        for d in dets:
            n = d["scores"].shape[0]
            pad = self.k - n
            boxes.append(F.pad(d["boxes"][: self.k], [0, 0, 0, pad]))
            scores.append(F.pad(d["scores"][: self.k], [0, pad]))
            labels.append(F.pad(d["labels"][: self.k], [0, pad]))
        return torch.stack(boxes), torch.stack(scores), torch.stack(labels)


def export_onnx(
    detector: Any, path: str | Path, example: Tensor, max_detections: int = 100
) -> dict[str, Any]:
    """Write ``path`` (.onnx) and ``path.json`` (sidecar); ``example`` is one resized image
    ``(1, 3, H, W)``.

    Uses the TorchScript-based exporter (``dynamo=False``): torchvision registers ONNX
    symbolics for its detection ops (NMS, RoIAlign) there.
    """
    if example.ndim != 4 or example.shape[0] != 1:
        raise TLError(
            f"ONNX export takes one example image (1, 3, H, W), got {tuple(example.shape)}"
        )
    path = Path(path)
    side = path.with_suffix(path.suffix + ".json")
    for p in (path, side):
        if p.exists():
            raise TLError(f"{p} exists; tl does not overwrite it (pass another output)")
    # a detector returns at most detections_per_img boxes per image: size K to that
    det = detector.det
    k = int(
        getattr(det, "detections_per_img", None)
        or getattr(det.roi_heads, "detections_per_img", 100)
    )
    k = min(k, max_detections)
    wrapper = ExportWrapper(detector, k).eval()
    try:
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            input_names=["images"],
            output_names=["boxes", "scores", "labels"],
            dynamic_axes={"images": {2: "height", 3: "width"}},
            opset_version=OPSET,
            dynamo=False,
        )
    except Exception as e:  # noqa: BLE001 - the exporter raises many types
        if path.exists():
            path.unlink()
        raise TLError(
            f"ONNX export of the detector failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        ) from None
    sidecar = {
        "task": "detection",
        "class_names": list(detector.class_names),
        "image_size": int(detector.preprocessing["image_size"]),
        "mean": list(detector.preprocessing["mean"]),
        "std": list(detector.preprocessing["std"]),
        "input": "images: (1, 3, height, width) RGB float in [0, 1], resized so that the long "
        "side is image_size. Normalisation and padding happen inside",
        "outputs": {
            "boxes": f"(1, {k}, 4) x1, y1, x2, y2 in input pixels (divide by the resize "
            "factor for original pixels)",
            "scores": f"(1, {k}); rows past an image's detections have score 0",
            "labels": f"(1, {k}) class index + 1 (class_names[label - 1]); 0 on padding rows",
        },
        "batch": 1,
        "batch_note": "fixed at 1: the post-processing's per-image loop is traced for one image",
        "head": detector.head_name,
        "opset": OPSET,
    }
    side.write_text(json.dumps(sidecar, indent=2))
    return sidecar


def check_onnx(
    detector: Any, path: str | Path, images: list[Tensor], atol: float = 1e-2
) -> dict[str, float]:
    """Run the ONNX file and PyTorch on the same resized images (one at a time) and compare
    the boxes above score 0.3: returns the largest box and score differences and how many
    boxes were compared."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapper = ExportWrapper(detector).eval()
    worst_box = worst_score = 0.0
    compared = 0
    with torch.no_grad():
        for img in images:
            b_ref, s_ref, l_ref = wrapper(img[None])
            b, s, lab = sess.run(None, {"images": img[None].numpy()})
            keep = s_ref[0].numpy() >= 0.3
            keep_o = s[0] >= 0.3
            if keep.sum() != keep_o.sum():
                raise TLError(
                    f"ONNX check: {int(keep_o.sum())} boxes above 0.3 in ONNX, {int(keep.sum())} in PyTorch"
                )
            compared += int(keep.sum())
            if keep.any():
                worst_box = max(
                    worst_box, float(np.abs(b[0][keep_o] - b_ref[0].numpy()[keep]).max())
                )
                worst_score = max(
                    worst_score, float(np.abs(s[0][keep_o] - s_ref[0].numpy()[keep]).max())
                )
                if (lab[0][keep_o] != l_ref[0].numpy()[keep]).any():
                    raise TLError("ONNX check: labels differ from PyTorch")
    return {"max_box_diff": worst_box, "max_score_diff": worst_score, "compared": compared}

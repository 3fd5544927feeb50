"""Object detection: an ImageNet backbone of tl's registry transferred to boxes.

Modules: ``formats`` (Pascal VOC / COCO / YOLO readers, detected from the folder), ``transforms``
(box-aware v2 augmentation and the long-side resize), ``dataset`` (samples -> tensors, collate),
``model`` (multi-scale features + feature pyramid + a torchvision head: FCOS, RetinaNet or
Faster R-CNN), ``cache`` (frozen-backbone feature maps computed once), ``metrics`` (COCO mAP via
torchmetrics, error analysis, plots), ``outputs`` (prediction rows, COCO results, drawings) and
``export`` (ONNX).
"""

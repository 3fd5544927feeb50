"""``task=detection``: the Task-interface side of object detection.

The backbone stays ``task.backbone`` (a tl registry backbone with ``block_groups()``), so the
transfer strategies (feature extraction, fine-tuning, freeze-unfreeze, gradual unfreezing,
layer-wise LR decay, BatchNorm policy, L2-SP) apply unchanged. ``task.head`` is everything new:
the feature pyramid and the torchvision head (``head.name=fcos|retinanet|fasterrcnn``), which
read the backbone's stride-8/16/32 maps. With the backbone frozen the maps are cached once
(``CachedDetectionData``) instead of the pooled features classification caches.

Labels: ``class_names[0]`` is ``__background__`` (torchvision's label 0), objects are 1..C.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tl_cli.core.errors import TLError
from tl_cli.tasks.base import TASKS, EvalOutputs, Evaluation, ExportSpec, Predictor, TransferTask
from tl_cli.tasks.detection import metrics as M
from tl_cli.tasks.detection.data import BACKGROUND, CachedDetectionData, to_device
from tl_cli.tasks.detection.model import HEADS, Detector, detector_on
from tl_cli.tasks.detection.transforms import load_image, resize_long_side, to_original
from tl_cli.transfer.heads import HEADS as CLS_HEADS
from tl_cli.transfer.strategies import GroupPlan


class DetectionHeadOptions(torch.nn.Module):
    """``head=fcos|retinanet|fasterrcnn`` in the ``HEADS`` registry: checks the options when a
    config is validated. The detector itself is built by :meth:`DetectionTask.build_head` (it
    reads the backbone's multi-scale maps, not pooled features); any other task that gets this
    head stops at its first forward with one line."""

    def __init__(
        self, in_features: int, num_classes: int, fpn_channels: int = 128, head_convs: int = 4
    ) -> None:
        super().__init__()
        for key, v, low in (("fpn_channels", fpn_channels, 32), ("head_convs", head_convs, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise TLError(f"head.{key}={v!r} must be an integer >= {low}")
        if fpn_channels % 32:
            raise TLError(f"head.fpn_channels={fpn_channels} must be a multiple of 32")

    def forward(self, x: Tensor) -> Tensor:
        raise TLError("head=fcos|retinanet|fasterrcnn are detection heads: use task=detection")


for _name in HEADS:
    if _name not in CLS_HEADS:
        CLS_HEADS.register(_name, DetectionHeadOptions)


class DetectionPredictor(Predictor):
    """``tl predict``: one row per box, ``path,label,score,x1,y1,x2,y2`` in original pixels
    (csv), the same as a JSON list (json), or COCO's results format (coco). ``score_threshold``
    (default 0.5) filters rows; ``draw=true`` writes annotated copies beside the output."""

    formats = ("csv", "json", "coco")

    def load(self):
        resize = resize_long_side(int(self.module.image_size))

        def read(path: Any) -> tuple[Tensor, tuple[int, int], Tensor]:
            raw = load_image(path)
            img = resize(raw).float().div(255)
            return img, (int(raw.shape[-2]), int(raw.shape[-1])), raw

        return read

    def collate(self, inputs: list[Any]) -> Any:
        return inputs

    def forward(self, batch: Any) -> Any:
        device = self.module.device
        dets = self.module.detector([img.to(device) for img, _, _ in batch])
        out = []
        for (img, (h, w), raw), d in zip(batch, dets, strict=True):
            scale = (img.shape[-1] / w, img.shape[-2] / h)
            boxes = to_original(d["boxes"].float().cpu(), scale)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            out.append(
                ({"boxes": boxes, "scores": d["scores"].cpu(), "labels": d["labels"].cpu()}, raw)
            )
        return out

    def nonfinite(self, outputs: Any) -> int | None:
        for i, (d, _) in enumerate(outputs):
            if not (torch.isfinite(d["boxes"]).all() and torch.isfinite(d["scores"]).all()):
                return i
        return None

    @property
    def threshold(self) -> float:
        t = self.cfg.get("score_threshold", 0.5) if self.cfg is not None else 0.5
        try:
            t = float(t)
        except (TypeError, ValueError):
            raise TLError(f"score_threshold={t!r} must be a number in [0, 1]") from None
        if not 0.0 <= t <= 1.0:
            raise TLError(f"score_threshold={t} must be in [0, 1]")
        return t

    def postprocess(self, outputs: Any) -> list[Any]:
        names = self.module.object_names
        out = []
        for d, raw in outputs:
            keep = d["scores"] >= self.threshold
            order = d["scores"][keep].argsort(descending=True)
            boxes = [[round(v, 1) for v in b] for b in d["boxes"][keep][order].tolist()]
            scores = [round(s, 4) for s in d["scores"][keep][order].tolist()]
            labels = [names[int(c) - 1] for c in d["labels"][keep][order].tolist()]
            out.append({"boxes": boxes, "scores": scores, "labels": labels, "_image": raw})
        return out

    def write(self, path: Path, rows: list[dict[str, Any]], fmt: str) -> None:
        from tl_cli.core.outputs import write_text

        if self.cfg is not None and self.cfg.get("draw"):
            self._draw(Path(path), rows)
        if fmt == "coco":
            ids = {n: i + 1 for i, n in enumerate(self.module.object_names)}
            res = []
            for k, r in enumerate(rows):
                if r["result"] is None:
                    continue
                for b, s, lab in zip(
                    r["result"]["boxes"], r["result"]["scores"], r["result"]["labels"], strict=True
                ):
                    res.append(
                        {
                            "image_id": k,
                            "file_name": r["path"],
                            "category_id": ids[lab],
                            "bbox": [b[0], b[1], round(b[2] - b[0], 1), round(b[3] - b[1], 1)],
                            "score": s,
                        }
                    )
            write_text(path, json.dumps(res, indent=1) + "\n")
            return
        flat = []
        for r in rows:
            if r["result"] is None:
                flat.append(
                    {
                        "path": r["path"],
                        "label": "",
                        "score": "",
                        "x1": "",
                        "y1": "",
                        "x2": "",
                        "y2": "",
                        "error": r["error"] or "",
                    }
                )
                continue
            for b, s, lab in zip(
                r["result"]["boxes"], r["result"]["scores"], r["result"]["labels"], strict=True
            ):
                flat.append(
                    {
                        "path": r["path"],
                        "label": lab,
                        "score": s,
                        "x1": b[0],
                        "y1": b[1],
                        "x2": b[2],
                        "y2": b[3],
                        "error": "",
                    }
                )
        if fmt == "json":
            write_text(path, json.dumps(flat, indent=1) + "\n")
            return
        buf = io.StringIO()
        w = csv.DictWriter(
            buf, fieldnames=["path", "label", "score", "x1", "y1", "x2", "y2", "error"]
        )
        w.writeheader()
        w.writerows(flat)
        write_text(path, buf.getvalue())

    def _draw(self, out: Path, rows: list[dict[str, Any]]) -> None:
        """Annotated copies in ``<output stem>_drawn/`` (never over an existing file)."""
        from tl_cli.tasks.detection.outputs import save_drawn

        folder = out.parent / f"{out.stem.split('.')[0]}_drawn"
        names = self.module.object_names
        for k, r in enumerate(rows):
            res = r["result"]
            if res is None:
                continue
            det = {
                "boxes": torch.tensor(res["boxes"], dtype=torch.float32).reshape(-1, 4),
                "scores": torch.tensor(res["scores"], dtype=torch.float32),
                "labels": torch.tensor(
                    [names.index(n) + 1 for n in res["labels"]], dtype=torch.int64
                ),
            }
            save_drawn(
                res["_image"], det, names, folder / f"{k:05d}_{Path(r['path']).stem}.png", 0.0
            )

    def show(self, rows: list[dict[str, Any]], limit: int = 20) -> None:
        from rich.table import Table

        from tl_cli.core.console import show

        t = Table(title=f"detections (score >= {self.threshold:g})")
        for c in ("path", "boxes", "top"):
            t.add_column(c)
        for r in rows[:limit]:
            res = r["result"]
            if res is None:
                t.add_row(r["path"], "error", str(r["error"]))
                continue
            top = ", ".join(
                f"{lab} {s:.2f}"
                for lab, s in list(zip(res["labels"], res["scores"], strict=True))[:3]
            )
            t.add_row(Path(r["path"]).name, str(len(res["boxes"])), top)
        show(t)


class DetectionTask(TransferTask):
    """Boxes from a registry backbone: pyramid + torchvision head, COCO mAP.

    ``head``: ``{name: fcos|retinanet|fasterrcnn, fpn_channels: 128, head_convs: 4}``.
    """

    monitor = M.MONITOR
    epoch_metrics = ("train/loss", "val/map_50", "val/map")
    final_metrics = (
        "val/map_50",
        "val/map",
        "test/map",
        "test/map_50",
        "test/map_75",
        "test/mar_100",
    )
    gate_metrics = ("map", "map_50", "map_75", "mar_100")
    eval_summary = ("map", "map_50", "map_75", "mar_100", "num_samples")
    predictor_class = DetectionPredictor

    # ------------------------------------------------------------------ model
    def build_head(self, head: dict[str, Any]) -> torch.nn.Module:
        cfg = dict(head)
        name = cfg.pop("name", "fcos")
        if name not in HEADS:
            raise TLError(
                f"head={name!r} is not a detection head; task=detection takes head={'|'.join(HEADS)}"
            )
        if self.class_names[0] != BACKGROUND:
            raise TLError(
                f"task=detection: class_names must start with {BACKGROUND!r} (dataset=detection)"
            )
        allowed = {"fpn_channels", "head_convs"}
        bad = sorted(set(cfg) - allowed)
        if bad:
            raise TLError(
                f"head.{bad[0]} is not an option of head={name} (options: fpn_channels, head_convs)"
            )
        overrides = dict(self.hparams.get("preprocessing_overrides") or {})
        image_size = int(overrides.get("image_size") or 384)
        det = detector_on(
            self.backbone,
            self.class_names[1:],
            name,
            image_size,
            int(cfg.get("fpn_channels", 128)),
            int(cfg.get("head_convs", 4)),
            register_backbone=False,
        )
        return det

    def build_extra(self) -> None:
        # a detection head is not a convex problem on pooled features: no L-BFGS head fit, so
        # no head-only epoch before fine-tuning either (the head trains by SGD from epoch 0)
        self.strategy.head_fit = "sgd"
        self._freeze_early_groups()
        # metrics are made on first use (not submodules: a checkpoint's shell is built on the
        # meta device, where torchmetrics cannot live, and their state stays on the CPU)
        self._maps: dict[str, Any] = {}

    def _freeze_early_groups(self) -> None:
        """The backbone's stem and stride-2/4 stages never train, under any strategy.

        torchvision's detectors (``trainable_backbone_layers=3``) and Detectron2
        (``FREEZE_AT=2``) keep them frozen by default: low-level edges and textures transfer as
        they are, and their high-resolution backward pass is the costliest part of a CPU step.
        The strategy's plan for those leading block groups becomes "never"; the later groups
        keep theirs (fine-tuning, freeze-unfreeze, gradual unfreezing, layer-wise decay).
        """
        early = {id(p) for p in self.detector.early_parameters()}
        groups = self.backbone.block_groups()
        k = 0
        for names in groups:
            if not names or any(id(self.backbone.get_parameter(n)) not in early for n in names):
                break
            k += 1
        if not k:
            return
        strategy, plans_of, n_groups = self.strategy, self.strategy.group_plans, len(groups)

        def group_plans(n: int) -> list[GroupPlan]:
            plans = plans_of(n)
            if n != n_groups:  # a query about the strategy itself (backbone_ever_trains)
                return plans
            return [GroupPlan(None, p.lr_mult) if i < k else p for i, p in enumerate(plans)]

        strategy.group_plans = group_plans  # type: ignore[method-assign]
        self.frozen_early_groups = k

    @property
    def detector(self) -> Detector:
        return self.head  # type: ignore[return-value]

    @property
    def object_names(self) -> list[str]:
        return self.class_names[1:]

    @property
    def image_size(self) -> int:
        return int(self.detector.preprocessing["image_size"])

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Resized float images (list) -> detections in their pixels (labels 1..C)."""
        return self.detector(images)

    def can_cache_features(self) -> bool:
        return False  # pooled features mean nothing to a detector; see uncached_data

    def uncached_data(self, dm: Any) -> Any:
        if self.policy.can_cache_features:  # the backbone never trains: cache its maps
            return CachedDetectionData(dm, self)
        return dm

    def scores_only(self) -> bool:
        return False

    # ------------------------------------------------------------------ steps
    def _losses(self, batch: Any) -> tuple[dict[str, Tensor], int]:
        if isinstance(batch[0], dict):  # cached maps (an ordered dict per level)
            maps, sizes, targets = batch
            return self.detector.losses(maps, sizes, targets), len(targets)
        images, targets = batch
        return self.detector(images, targets), len(targets)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        losses, n = self._losses(batch)
        loss = sum(losses.values())
        if self.policy.l2sp_alpha:
            penalty = self.policy.l2sp_penalty()
            self.log("train/l2sp", penalty, on_step=False, on_epoch=True, batch_size=n)
            loss = loss + self.policy.l2sp_alpha * penalty
        self.log(
            "train/loss",
            loss,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=n,
            sync_dist=True,
        )
        return loss

    def predict_original(
        self, batch: Any
    ) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
        """Detections and targets in original pixels, from images or cached maps."""
        if isinstance(batch[0], dict):
            maps, sizes, targets = batch
            dets = self.detector.detect(maps, sizes)
        else:
            images, targets = batch
            dets = self.detector(images)
        preds, gts = [], []
        for d, t in zip(dets, targets, strict=True):
            preds.append({**d, "boxes": to_original(d["boxes"], t["scale"])})
            gts.append({**t, "boxes": to_original(t["boxes"], t["scale"])})
        return preds, gts

    def _map(self, stage: str) -> Any:
        if stage not in self._maps:
            self._maps[stage] = M.make_metric()
        return self._maps[stage]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._map("val").update(*M.metric_inputs(*self.predict_original(batch)))

    def on_validation_epoch_end(self) -> None:
        result = self._map("val").compute()
        self._map("val").reset()
        for k in ("map", "map_50"):
            self.log(f"val/{k}", float(result[k]), prog_bar=k == "map_50")
        super().on_validation_epoch_end()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        preds, gts = self.predict_original(batch)
        self._map("test").update(*M.metric_inputs(preds, gts))

    def on_test_epoch_end(self) -> None:
        result = self._map("test").compute()
        self._map("test").reset()
        for k in M.KEYS:
            self.log(f"test/{k}", float(result[k]))

    # ------------------------------------------------------------------ tl eval
    @torch.inference_mode()
    def evaluate(self, loader: Any, device: torch.device, desc: str) -> Evaluation:
        from tl_cli.core.console import progress

        self.to(device).eval()
        metric = M.make_metric(extended=True)
        outputs = []
        with progress(desc, len(loader)) as advance:
            for images, targets in loader:
                images = [i.to(device) for i in images]
                preds, gts = self.predict_original((images, to_device(targets, device)))
                metric.update(*M.metric_inputs(preds, gts))
                for p, t in zip(preds, gts, strict=True):
                    outputs.append(
                        (
                            int(t["index"]),
                            {k: v.cpu() for k, v in p.items()},
                            {k: v.cpu() for k, v in t.items()},
                        )
                    )
                advance()
        result = metric.compute()
        from tl_cli.tasks.detection.report import per_class_table

        table = per_class_table(result, self.object_names)
        metrics = {k: round(float(result[k]), 4) for k in M.KEYS}
        metrics["per_class"] = table
        nonfinite = sum(1 for _, p, _ in outputs if not torch.isfinite(p["scores"]).all())
        return Evaluation(metrics, len(outputs), {"outputs": outputs, "result": result}, nonfinite)

    def evaluation_outputs(
        self, ev: Evaluation, out: Path, dataset: Any, cfg: Any, split: str, noun: str
    ) -> EvalOutputs:
        from tl_cli.tasks.detection.report import write_eval_artifacts

        samples = dataset.samples  # the split's DetectionDataset (its records, in order)
        art = write_eval_artifacts(
            ev.details["outputs"],
            samples,
            ev.details["result"],
            self.object_names,
            out,
            float(cfg.get("score_threshold", 0.5)) if cfg is not None else 0.5,
        )
        ev.metrics["errors"] = art["errors"]
        report = [
            "## Per-class AP",
            "",
            "| class | AP | AP@0.5 | AR@100 |",
            "| --- | ---: | ---: | ---: |",
        ]
        report += [
            f"| {r['class']} | {r['ap']:.3f} | {r['ap_50']:.3f} | {r['ar_100']:.3f} |"
            for r in art["per_class"]
        ]
        report += ["", f"![precision-recall]({Path(art['files']['pr_curve']).name})", ""]
        if "detections" in art["files"]:
            report += [
                f"![test detections: truth green, predictions red]({Path(art['files']['detections']).name})",
                "",
            ]
        th = art["score_threshold"]
        report += [f"## Images with the most missed boxes (score >= {th:g}, IoU 0.5)", ""]
        report += [
            f"- {r['image']}: {r['missed']} of {r['boxes']} boxes missed"
            for r in art["errors"]["most_missed"]
        ] or ["- none"]
        report += ["", f"## Images with the most spurious boxes (score >= {th:g}, IoU 0.5)", ""]
        report += [
            f"- {r['image']}: {r['spurious']} spurious ({r['boxes']} true boxes)"
            for r in art["errors"]["most_spurious"]
        ] or ["- none"]
        report.append("")
        return EvalOutputs(report=report, lines=[], files=art["files"])

    def show_evaluation(self, ev: Evaluation, split: str, noun: str) -> None:
        from rich.table import Table

        from tl_cli.core.console import show

        t = Table(title=f"per-class AP ({split})")
        for c in ("class", "AP", "AP@0.5", "AR@100"):
            t.add_column(c, justify="left" if c == "class" else "right")
        for r in ev.metrics.get("per_class", []):
            t.add_row(r["class"], f"{r['ap']:.3f}", f"{r['ap_50']:.3f}", f"{r['ar_100']:.3f}")
        show(t)

    def check_classes(self, got: list[str], where: str) -> None:
        super().check_classes(got, where)

    # ------------------------------------------------------------------ tl export
    def export_spec(self, modality: Any, prep: dict[str, Any]) -> ExportSpec:
        """FCOS with batched post-processing (``export.FCOSExport``): any batch size."""
        from tl_cli.tasks.detection.export import FCOSExport

        net = FCOSExport(self.detector).eval()
        s = self.image_size
        return ExportSpec(
            net=net,
            output_names=["detections"],
            output_axes={"detections": {0: "batch"}},
            sidecar={
                "class_names": list(self.class_names),
                "output": {
                    "name": "detections",
                    "shape": ["batch", net.k, 6],
                    "columns": ["x1", "y1", "x2", "y2", "score", "label"],
                    "meaning": "boxes in the input's pixels, best first; label indexes "
                    "class_names (0 = __background__ with score 0 on padding rows)",
                },
                "detection_input": f"RGB in [0, 1] resized so that the long side is {s} (aspect "
                f"kept), normalised (x - mean) / std, zero-padded bottom/right to {s}x{s}; "
                "divide the boxes by the resize factor for original pixels",
            },
        )


TASKS.register("detection", DetectionTask)

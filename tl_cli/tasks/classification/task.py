"""Single-label classification: one class per input (images, texts, clips).

Cross-entropy (label smoothing in training only), accuracy, macro-F1 and balanced accuracy;
``tl eval`` adds per-class precision/recall, the confusion matrix and the error analysis
(``tl_cli.tasks.classification.evaluation``); ``tl predict`` writes the top-k labels per input;
``tl export`` writes logits.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning_fabric.utilities.apply_func import move_data_to_device
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from tl_cli.core.console import fmt, progress, show
from tl_cli.core.errors import TLError
from tl_cli.core.metrics import PREDICTIONS_SCHEMA_VERSION
from tl_cli.core.outputs import atomic_path, write_json
from tl_cli.tasks.base import (
    TASKS,
    EvalOutputs,
    Evaluation,
    ExportSpec,
    Predictor,
    TransferTask,
)


class ExportModel(torch.nn.Module):
    """Input tensors -> logits: the backbone and head, without Lightning around them.

    ``pack`` (the modality's) turns the graph's input tensors into what the backbone takes
    (images: the one tensor; text: a dict of token ids and attention mask).
    """

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module, pack: Any = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.pack = pack

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        x = self.pack(*xs) if self.pack is not None else xs[0]
        return self.head(self.backbone(x))


class ClassificationPredictor(Predictor):
    """Top-k labels and probabilities per input: ``path,label_1,prob_1,...,label_k,prob_k,error``
    (CSV) or a JSON document with the same rows (``topk=K``, default 5)."""

    def __init__(self, module: Any, modality: Any, prep: dict[str, Any], cfg: Any) -> None:
        super().__init__(module, modality, prep, cfg)
        topk = cfg.get("topk", 5)
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise TLError(f"topk={topk!r} must be a whole number >= 1")
        self.class_names = list(module.class_names)
        self.k = min(topk, len(self.class_names))

    def forward(self, batch: Any) -> torch.Tensor:
        return self.module.tta_forward(batch)  # tta=flip: averaged with the mirror images

    def nonfinite(self, outputs: torch.Tensor) -> int | None:
        finite = torch.isfinite(outputs.float()).all(dim=1).cpu()
        return None if bool(finite.all()) else int((~finite).nonzero()[0])

    def postprocess(self, outputs: torch.Tensor) -> list[Any]:
        probs = torch.softmax(outputs.float(), dim=1).cpu()
        top_p, top_i = probs.topk(self.k, dim=1)
        return [
            [{"label": self.class_names[c], "prob": float(p)} for p, c in zip(ps, cs, strict=True)]
            for ps, cs in zip(top_p.tolist(), top_i.tolist(), strict=True)
        ]

    def write(self, path: Path, rows: list[dict[str, Any]], fmt: str) -> None:
        if fmt == "csv":
            with atomic_path(path) as tmp:  # written beside it, then renamed: never half a file
                write_csv(tmp, rows, self.k, self.modality.item_column)
            return
        write_json(
            path,
            {
                "schema_version": PREDICTIONS_SCHEMA_VERSION,
                "checkpoint": str(Path(str(self.cfg.checkpoint)).resolve()),
                "class_names": self.class_names,
                "topk": self.k,
                "num_inputs": len(rows),
                "num_images": len(rows),  # tl 0.1's name, kept for readers of schema 1
                "num_errors": sum(1 for r in rows if r["error"]),
                "predictions": [
                    {
                        self.modality.item_column: r["path"],
                        "topk": r["result"] or [],
                        "error": r["error"],
                    }
                    for r in rows
                ],
            },
        )

    def show(self, rows: list[dict[str, Any]], limit: int = 20) -> None:
        from rich.markup import escape
        from rich.table import Table

        from tl_cli.core.console import console

        k = self.k
        more = f", first {limit}" if len(rows) > limit else ""
        t = Table(title=f"predictions ({len(rows)} {self.noun}{more})", header_style="bold")
        t.add_column(self.noun[:-1] if self.noun.endswith("s") else self.noun)
        t.add_column("top-1", justify="left")
        t.add_column("prob", justify="right")
        if k > 1:
            t.add_column(f"top-2..{k}" if k > 2 else "top-2", justify="left")
        for r in rows[:limit]:
            name = escape(r["path"] if len(r["path"]) <= 60 else "..." + r["path"][-57:])
            if r["error"]:
                cells = [name, f"[red]error[/] {escape(r['error'][:60])}", ""]
                if k > 1:
                    cells.append("")
            else:
                top = r["result"]
                cells = [name, escape(top[0]["label"]), f"{top[0]['prob']:.3f}"]
                if k > 1:
                    cells.append(
                        escape(", ".join(f"{e['label']} {e['prob']:.2f}" for e in top[1:]))
                    )
            t.add_row(*cells)
        console.print(t)


def write_csv(path: Path, rows: list[dict[str, Any]], k: int, first: str = "path") -> None:
    """Columns: ``first`` (the modality's item column: path, or text), label_1, prob_1, ...,
    label_k, prob_k, error (empty when the input was read)."""
    header = [first] + [c for j in range(1, k + 1) for c in (f"label_{j}", f"prob_{j}")] + ["error"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            top = r["result"] or []
            cells: list[Any] = [r["path"]]
            for j in range(k):
                if j < len(top):
                    cells += [top[j]["label"], f"{top[j]['prob']:.6f}"]
                else:
                    cells += ["", ""]
            w.writerow([*cells, r["error"] or ""])


class SelectMonitor:
    """A classifier's ``monitor``: ``("val/score", "max")`` (the highest val/acc, ties broken by
    the lower val/loss: `val_score`), or ``("val/select", "max")`` on a module whose run starts
    with a head-only epoch: a fine-tuned epoch must then beat the head alone by more than the
    noise (`beats_head_only`). Read on the class, the default; a value set on a module (domain
    adaptation: ``val/epoch``) wins."""

    default = ("val/score", "max")

    def __get__(self, obj: Any, owner: type | None = None) -> tuple[str, str]:
        if obj is None:
            return self.default
        if "_monitor" in obj.__dict__:
            return obj.__dict__["_monitor"]
        return ("val/select", "max") if obj.selects_against_head_only() else self.default

    def __set__(self, obj: Any, value: tuple[str, str]) -> None:
        obj.__dict__["_monitor"] = tuple(value)


@TASKS.register("classification")
class ClassificationTask(TransferTask):
    """Single-label classification: cross-entropy (label smoothing in training), accuracy, macro-F1."""

    def build_extra(self) -> None:
        n = self.num_outputs
        self.train_acc = MulticlassAccuracy(n, average="micro")
        self.val_acc = MulticlassAccuracy(n, average="micro")
        self.test_acc = MulticlassAccuracy(n, average="micro")
        self.test_f1 = MulticlassF1Score(n, average="macro")
        # balanced accuracy = mean per-class recall
        self.val_bacc = MulticlassAccuracy(n, average="macro")
        self.test_bacc = MulticlassAccuracy(n, average="macro")
        # val: [correct, summed loss, images] for val/score; predicted-class counts per stage
        self._val_sums = torch.zeros(3, dtype=torch.float64)
        self.pred_counts: dict[str, torch.Tensor] = {}
        # val items right (in loader order, this rank's) this epoch, and in the head-only epoch
        self._val_right: list[torch.Tensor] = []
        self._head_only_right: torch.Tensor | None = None

    #: what picks best.ckpt (`SelectMonitor`): val/score, or val/select after a head-only epoch
    monitor = SelectMonitor()

    def selects_against_head_only(self) -> bool:
        """A head-only epoch (an L-BFGS head before fine-tuning) is the reference best.ckpt
        compares the fine-tuned epochs with."""
        return bool(self.policy.head_only_epochs) and not self.skip_head_fit

    @property
    def tta_modes(self) -> tuple[str, ...]:  # type: ignore[override]
        """``flip`` (the mean of an image's and its mirror image's logits) for image models."""
        if getattr(self.backbone, "modality", "image") == "image":
            return ("none", "flip")
        return ("none",)

    def tta_forward(self, x: Any) -> torch.Tensor:
        """Logits with ``tta`` applied: ``flip`` averages the logits of the images and of their
        left-right mirror images (for a linear head, the logits of the mean feature vector).
        Off by default: a mirror image is another class where handedness matters (text, some
        digits, left/right anatomy); measured in docs/benchmarks.md (issue 24)."""
        out = self(x)
        if self.tta == "flip":
            out = (out + self(torch.flip(x, dims=[-1]))) / 2
        return out

    # ------------------------------------------------------------------ tl eval / predict / export
    predictor_class = ClassificationPredictor

    @torch.inference_mode()
    def evaluate(self, loader: Any, device: torch.device, desc: str) -> Evaluation:
        from tl_cli.tasks.classification.evaluation import score

        self.to(device).eval()
        outs, ys = [], []
        with progress(desc, total=len(loader)) as advance:
            for x, y in loader:
                outs.append(self.tta_forward(move_data_to_device(x, device)).float().cpu())
                ys.append(torch.as_tensor(y))
                advance()
        logits, y = torch.cat(outs), torch.cat(ys)
        metrics = score(logits, y, self.class_names)
        bad = int((~torch.isfinite(logits)).any(dim=1).sum())
        return Evaluation(metrics, int(y.numel()), {"logits": logits, "labels": y}, bad)

    def evaluation_outputs(
        self, ev: Evaluation, out: Path, dataset: Any, cfg: Any, split: str, noun: str
    ) -> EvalOutputs:
        """confusion_matrix.png, misclassified.csv, top_losses.png and the report sections."""
        from tl_cli.core.markdown import md_table
        from tl_cli.tasks.classification.evaluation import interpret, plot_confusion

        m = ev.metrics
        normalize = bool(cfg.get("confusion_normalize", True))
        title = (
            f"Confusion matrix{' (row-normalised)' if normalize else ''}: {split}, "
            f"{ev.num_samples} {noun}, acc {m.get('acc', 0.0):.3f}"
        )
        png = plot_confusion(
            m["confusion_matrix"],
            self.class_names,
            out / "confusion_matrix.png",
            normalize,
            title,
            noun,
        )
        rows = [
            [c, r["precision"], r["recall"], r["f1"], r["support"]]
            for c, r in m["per_class"].items()
        ]
        res = EvalOutputs(
            report=[
                "## Per class",
                "",
                md_table(["class", "precision", "recall", "f1", "support"], rows),
                "",
                "## Confusion matrix",
                "",
                "![Confusion matrix](confusion_matrix.png)",
                "",
            ],
            files={"confusion_matrix": str(png)},
        )
        items = getattr(dataset, "items", None)
        if items is None or len(items) != ev.num_samples:
            return res
        err = interpret(
            out,
            ev.details["logits"],
            ev.details["labels"],
            [item for item, _ in items],
            getattr(dataset, "loader", None),
            self.class_names,
            m["confusion_matrix"],
        )
        pairs = ", ".join(
            f"{c['true']} -> {c['predicted']} ({c['count']})" for c in err["most_confused"]
        )
        res.lines += [
            f"most confused (true -> predicted): {pairs or 'none'}",
            f"{err['misclassified']} misclassified: {err['misclassified_csv']}"
            + (f"; highest losses: {err['top_losses_png']}" if err["top_losses_png"] else ""),
        ]
        res.report += [
            "## Errors",
            "",
            f"- most confused (true -> predicted): {pairs or 'none'}",
            f"- {err['misclassified']} misclassified, highest loss first: "
            "[misclassified.csv](misclassified.csv)",
        ]
        if err["top_losses_png"]:
            res.report += ["", "![Highest losses](top_losses.png)"]
        res.report.append("")
        res.files.update(misclassified=err["misclassified_csv"])
        if err["top_losses_png"]:
            res.files["top_losses"] = err["top_losses_png"]
        return res

    def show_evaluation(self, ev: Evaluation, split: str, noun: str) -> None:
        from rich.table import Table

        t = Table(title=f"per class ({split}, {ev.num_samples} {noun})", header_style="bold")
        for col in ("class", "precision", "recall", "f1", "support"):
            t.add_column(col, justify="left" if col == "class" else "right")
        for c, r in ev.metrics["per_class"].items():
            t.add_row(c, fmt(r["precision"]), fmt(r["recall"]), fmt(r["f1"]), str(r["support"]))
        show(t)

    def export_spec(self, modality: Any, prep: dict[str, Any]) -> ExportSpec:
        n = len(self.class_names)
        return ExportSpec(
            net=ExportModel(self.backbone, self.head, modality.pack).eval(),
            output_names=["logits"],
            output_axes={"logits": {0: "batch"}},
            sidecar={
                "class_names": list(self.class_names),
                "num_classes": n,
                "output": {
                    "name": "logits",
                    "shape": ["batch", n],
                    "note": "softmax gives probabilities",
                },
            },
        )

    def supports_head_fit(self) -> bool:
        return True

    #: under a strategy that trains the backbone after an L-BFGS head, ``head.norm=auto`` makes the
    #: head-only epoch score tl train's head and fits fine-tuning's start again
    #: (:meth:`auto_finetune_norm`); tl distill's student keeps one head (not measured for it)
    head_only_as_feature_extraction: bool = True

    def auto_head_norm(self) -> str:
        """``head.norm=auto``: ``l2`` for an image backbone with an L-BFGS head (``tl train``'s
        and ``tl finetune``'s defaults), else ``none``.

        Measured on every row of scripts/bench_defaults.py (docs/benchmarks.md, "Issue 24:
        feature extraction above the probe"): unit-length features let one L2 strength suit every
        image, where a few images with long feature vectors otherwise dominate the fit. When the
        backbone trains afterwards, that head is the head-only epoch's (a best.ckpt candidate)
        and fine-tuning starts from a head on raw features (:meth:`auto_finetune_norm`). Text and
        audio keep ``none`` (not measured).
        """
        if getattr(self.backbone, "modality", "image") != "image":
            return "none"
        if self.strategy.head_fit != "lbfgs" or getattr(self.strategy, "fit_head", None):
            return "none"
        if not self.strategy.backbone_ever_trains:
            return "l2"
        return "l2" if self.head_only_as_feature_extraction else "none"

    def auto_finetune_norm(self, norm: str) -> str | None:
        """Fine-tuning starts from a head fitted on raw features, scaled per dimension
        (``head.norm=none``, ``strategy.head_scale=dim``), when the head-only epoch's is the L2
        head: from the L2 head, fine-tuning lost 5-9 points of test accuracy on CIFAR 20/class at
        96 px, from the raw-feature head it never fell below its start (12 runs, 3 seeds;
        docs/benchmarks.md "Fine-tuning against the new feature-extraction head")."""
        if norm == "l2" and self.strategy.backbone_ever_trains:
            return "none"
        return None

    def auto_lr_mults(self) -> tuple[float, float, str]:
        """An image backbone under an L-BFGS head fine-tunes at ``optimizer.lr x 0.01`` (the
        backbone) and ``x 0.1`` (the head); anything else keeps the task default (0.1 / 1.0).

        Such a run starts at an optimum (the head fitted on the pretrained features) with
        BatchNorm frozen, and AdamW's first steps move every weight by about the LR whatever its
        gradient: at 1e-4 one step moved the features by a third to a half of their norm and
        the fine-tune collapsed on small sets; at 1e-3 a step moved the fitted head's logit
        margin by 30-40% (issue 24; docs/benchmarks.md "Fine-tuning collapse").
        """
        if getattr(self.backbone, "modality", "image") == "image" and (
            self.strategy.head_fit == "lbfgs"
        ):
            return 0.01, 0.1, "image backbone, L-BFGS head"
        return super().auto_lr_mults()

    def loss(self, out: torch.Tensor, y: torch.Tensor, stage: str) -> torch.Tensor:
        smoothing = self.label_smoothing if stage == "train" else 0.0
        weight = None
        if stage == "train" and self.class_weight is not None:
            weight = self.class_weight.to(out.device, out.dtype)
        return F.cross_entropy(out, y, weight=weight, label_smoothing=smoothing)

    def update_metrics(self, out: torch.Tensor, y: torch.Tensor, stage: str) -> None:
        acc = getattr(self, f"{stage}_acc")
        acc(out, y)
        if stage == "train" and (self.label_smoothing > 0 or self.class_weight is not None):
            # train/loss is the objective (smoothed, class-weighted); train/ce is the plain
            # cross-entropy, the number val/loss is comparable with
            with torch.no_grad():
                ce = F.cross_entropy(out.detach().float(), y)
            self.log("train/ce", ce, on_step=False, on_epoch=True, sync_dist=True)
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=stage == "val")
        if stage in ("val", "test"):
            bacc = getattr(self, f"{stage}_bacc")
            bacc(out, y)
            self.log(f"{stage}/balanced_acc", bacc, on_epoch=True)
            pred = out.detach().argmax(1)
            counts = torch.bincount(pred, minlength=self.num_outputs).cpu()
            self.pred_counts[stage] = self.pred_counts.get(stage, torch.zeros_like(counts)) + counts
        if stage == "val":
            with torch.no_grad():
                loss = F.cross_entropy(out.detach().float(), y, reduction="sum")
            self._val_sums += torch.tensor(
                [float((pred == y).sum()), float(loss), float(len(y))], dtype=torch.float64
            )
            self._val_right.append((pred == y).cpu())
        if stage == "test":
            self.test_f1(out, y)
            self.log("test/macro_f1", self.test_f1, on_epoch=True)

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(3, dtype=torch.float64)
        self._val_right = []
        self.pred_counts["val"] = torch.zeros(self.num_outputs, dtype=torch.long)

    def on_test_epoch_start(self) -> None:
        self.pred_counts["test"] = torch.zeros(self.num_outputs, dtype=torch.long)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        sums = self._val_sums.to(self.device)
        counts = self.pred_counts["val"].to(self.device)
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        correct, loss_sum, n = (float(v) for v in sums)
        if n > 0:
            score = val_score(correct / n, loss_sum / n, int(n))
            self.log("val/score", score)
            self.log("val/pred_classes", float((counts > 0).sum()))
            if self.selects_against_head_only():
                self.log("val/select", self._select_score(score))

    def _select_score(self, score: float) -> float:
        """``val/select``: val/score for the head-only epoch and for a fine-tuned epoch that
        beats it (`beats_head_only`), val/score - 2 for one that does not: below every epoch
        that counts (val/score is in (-1, 1]), in the same order among themselves.

        Both are scored on the same val items, in the loader's fixed order (each rank its own
        shard, the same every epoch), so the comparison is paired: ``gained`` items the epoch gets
        right that the head alone got wrong, ``lost`` the reverse (logged as val/gained and
        val/lost). Without a head-only reference (a run resumed from a checkpoint written before
        it was kept) the epoch is judged by val/score alone, as before.
        """
        right = torch.cat(self._val_right) if self._val_right else torch.zeros(0, dtype=torch.bool)
        if self.policy.head_only(self.current_epoch):
            if not self.trainer.sanity_checking:
                self._head_only_right = right.clone()
            return score
        ref = self._head_only_right
        if ref is None or ref.shape != right.shape:
            return score
        counts = torch.tensor(
            [float((right & ~ref).sum()), float((~right & ref).sum())],
            dtype=torch.float64,
            device=self.device,
        )
        if self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        gained, lost = (int(v) for v in counts)
        self.log("val/gained", float(gained))
        self.log("val/lost", float(lost))
        return score if beats_head_only(gained, lost) else score - 2.0

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._head_only_right is not None:  # a resumed fine-tune still compares with it
            checkpoint["tl_head_only_val"] = self._head_only_right.clone()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        ref = checkpoint.get("tl_head_only_val")
        if isinstance(ref, torch.Tensor) and ref.dtype == torch.bool and ref.dim() == 1:
            self._head_only_right = ref.clone()


def beats_head_only(gained: int, lost: int) -> bool:
    """Does a fine-tuned epoch beat the head-only state on val by more than the noise?

    Both are scored on the same val items: ``gained`` items the fine-tuned epoch gets right
    that the head alone got wrong, ``lost`` the reverse. If the two were equally good, each of
    the ``gained + lost`` items they disagree on would go either way with even odds (McNemar's
    sign test), so ``gained - lost`` has a standard deviation of ``sqrt(gained + lost)``. The
    fine-tuned epoch must beat the head alone by more than that one standard deviation: the
    one-standard-error rule (Breiman et al. 1984; Hastie, Tibshirani and Friedman, *Elements of
    Statistical Learning*, 7.10) with the head-only state as the simpler model, the one to keep
    unless the evidence is clear. Picking the best of many fine-tuned epochs on the same val
    items inflates the winner's score (the winner's curse), and on a small val split one item
    is 5-12 points. So a tie or a one-item gain is never enough (1 > sqrt(1) fails), two
    items are enough when nothing was lost (2 > sqrt(2)), and on a large split the margin
    grows with how many items the two disagree on, not with the split's size.
    """
    return gained - lost > math.sqrt(gained + lost)


def val_score(acc: float, loss: float, n: int) -> float:
    """The checkpoint criterion: val/acc, ties broken by the lower val/loss.

    ``acc - (0.5 / n) * loss / (1 + loss)`` for ``n`` validation images: the loss term is under
    half an image of accuracy, so it never outweighs a real accuracy difference and only orders
    epochs with the same accuracy (a lower loss always scores higher). Scaled by ``1 / n`` rather
    than a fixed tiny factor so that it survives Lightning's float32 metrics.
    """
    eps = 0.5 / max(1, n)
    if not math.isfinite(loss):
        return acc - eps
    return acc - eps * loss / (1.0 + loss)

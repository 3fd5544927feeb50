"""``task=ner``: named-entity recognition, token classification on a text backbone.

The model is the backbone's per-token hidden states (``TextBackbone.token_features``) under the
configured head (``head=linear``: dropout + a linear layer over the tag list, applied to every
token, as Hugging Face's ``*ForTokenClassification``). Batches come from ``dataset=ner``
(``tl_cli.tasks.ner.data``): windows of sub-tokens, a word's label on its first sub-token.

Scores: entity-level micro precision/recall/F1 by seqeval's default (conlleval) definition,
macro F1 over types, tag accuracy, and per type; ``val/f1`` picks best.ckpt. Each word is scored
once, from the window where it has most context, whatever order the loader serves windows in.

Heads train by gradient descent: ``strategy.head_fit=lbfgs`` (a logistic regression fitted on
frozen features) would be one over every training word, slower than the fine-tuning itself on
a CPU, so a NER task reads it as ``sgd``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.utilities.apply_func import move_data_to_device

from tl_cli.core.checkpoint import Int, Maybe, OneOf
from tl_cli.core.console import progress, say, show, warn
from tl_cli.core.errors import TLError
from tl_cli.core.outputs import write_text
from tl_cli.tasks.base import TASKS, EvalOutputs, Evaluation, ExportSpec, TransferTask
from tl_cli.tasks.ner import infer, schemes
from tl_cli.tasks.ner.align import gather_words, merge, split_by_sentence
from tl_cli.tasks.ner.model import TokenTagger, token_loss, word_tags
from tl_cli.tasks.ner.predict import NerPredictor

#: trainer.max_epochs=auto for NER: at least this many optimizer steps ...
MIN_STEPS = 600
#: ... in at least MIN_EPOCHS and at most MAX_EPOCHS epochs
MIN_EPOCHS = 3
MAX_EPOCHS = 30
#: sentences shown in errors.jsonl
ERROR_ROWS = 50


def auto_epochs(steps_per_epoch: int) -> int:
    """Epochs of a NER run: ``clamp(ceil(MIN_STEPS / steps per epoch), MIN_EPOCHS, MAX_EPOCHS)``."""
    return int(min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(MIN_STEPS / max(1, steps_per_epoch)))))


@TASKS.register("ner")
class NerTask(TransferTask):
    """Token classification: cross-entropy over first sub-tokens, seqeval entity scores.

    Args (beyond every task's):
        tag_scheme: the scheme of the training files (predictions are written back in it).
        stride: sub-tokens shared by consecutive windows (None: a quarter of a window).
    """

    monitor = ("val/f1", "max")
    epoch_metrics = ("train/loss", "val/loss", "val/f1")
    final_metrics = (
        "val/f1",
        "val/loss",
        "test/f1",
        "test/precision",
        "test/recall",
        "test/macro_f1",
        "test/token_acc",
    )
    gate_metrics = ("f1", "precision", "recall", "macro_f1", "token_acc", "loss")
    eval_summary = ("f1", "precision", "recall", "macro_f1", "token_acc")
    predictor_class = NerPredictor
    checkpoint_fields = {
        "tag_scheme": OneOf(*schemes.SCHEMES),
        "stride": Maybe(Int(0, 100_000)),
    }

    def __init__(
        self, *args: Any, tag_scheme: str = schemes.INTERNAL, stride: int | None = None, **kw: Any
    ) -> None:
        if tag_scheme not in schemes.SCHEMES:
            raise TLError(
                f"task.tag_scheme={tag_scheme!r} must be one of {', '.join(schemes.SCHEMES)}"
            )
        self.tag_scheme = tag_scheme
        self.stride = stride
        super().__init__(*args, **kw)
        self.types = sorted({t.split("-", 1)[1] for t in self.class_names if t != "O"})
        self._words: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def build_extra(self) -> None:
        self._lbfgs_read_as_sgd = getattr(self.strategy, "head_fit", "sgd") == "lbfgs"
        if self._lbfgs_read_as_sgd:
            self.strategy.head_fit = "sgd"  # see the module docstring

    # ------------------------------------------------------------------ model
    def features(self, x: Any) -> torch.Tensor:
        return self.backbone.token_features(x)

    def forward(self, x: Any) -> torch.Tensor:
        return self.head(self.backbone.token_features(x))

    def can_cache_features(self) -> bool:
        return False  # per-token features of every window: the encoder runs each epoch

    def setup(self, stage: str) -> None:
        if stage == "fit":
            dm = self.trainer.datamodule
            if self.auto_epochs and not self._head_epochs_added:
                # trainer.max_epochs=auto: NER's own budget (tl_cli.transfer.budget sized it for
                # classification), set before configure_optimizers sizes the schedule
                n = len(dm.dataset("train"))
                spe = math.ceil(n / max(1, int(dm.batch_size)) / max(1, self.trainer.world_size))
                self.trainer.fit_loop.max_epochs = auto_epochs(spe)
            # what predict and export need from the data, kept in the checkpoint
            self.tag_scheme = dm.source_scheme
            self.stride = dm.aligner.stride
            self.hparams["tag_scheme"] = self.tag_scheme
            self.hparams["stride"] = self.stride
            if self._lbfgs_read_as_sgd:
                say("[bold]head[/] task=ner trains the token head by SGD (strategy.head_fit=sgd)")
        super().setup(stage)

    # ------------------------------------------------------------------ training
    def loss(self, out: torch.Tensor, y: Any, stage: str) -> torch.Tensor:
        smoothing = self.label_smoothing if stage == "train" else 0.0
        return token_loss(out, y["labels"], smoothing)

    def update_metrics(self, out: torch.Tensor, y: Any, stage: str) -> None:
        if stage in ("val", "test"):
            idx, rows = gather_words(out.detach().float().cpu(), y["word_index"].cpu())
            self._words.setdefault(stage, ([], []))
            self._words[stage][0].append(idx)
            self._words[stage][1].append(rows)

    def on_validation_epoch_start(self) -> None:
        self._words["val"] = ([], [])

    def on_test_epoch_start(self) -> None:
        self._words["test"] = ([], [])

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self.trainer.sanity_checking:
            self._log_scores("val", self.trainer.val_dataloaders)

    def on_test_epoch_end(self) -> None:
        self._log_scores("test", self.trainer.test_dataloaders)

    def _log_scores(self, stage: str, loader: Any) -> None:
        ds = getattr(loader, "dataset", None)
        if ds is None or getattr(ds, "gold", None) is None:
            return
        idx, rows = self._words.get(stage, ([], []))
        idx, rows = self._gather(idx, rows)
        pred = self._tags(idx, rows, ds)
        m = infer.metrics.score(ds.gold, pred)
        logged = {f"{stage}/{k}": float(m[k]) for k in ("f1", "precision", "recall", "macro_f1")}
        logged[f"{stage}/token_acc"] = float(m["token_acc"])
        if stage == "test":
            for t, r in m["per_type"].items():
                for k, v in r.items():
                    logged[f"test/per_type/{t}/{k}"] = float(v)
        for k, v in logged.items():
            self.log(k, v, prog_bar=k == "val/f1")

    def _gather(
        self, idx: list[torch.Tensor], rows: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every rank's scored words (DDP); duplicates from a padded sampler are harmless."""
        if self.trainer.world_size <= 1:
            return idx, rows
        k = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)
        v = torch.cat(rows) if rows else torch.zeros(0, self.num_outputs)
        n = torch.tensor([len(k)], device=self.device)
        most = int(self.all_gather(n).max())
        kp = torch.full((most,), -1, dtype=torch.long, device=self.device)
        vp = torch.zeros(most, self.num_outputs, device=self.device)
        kp[: len(k)], vp[: len(k)] = k.to(self.device), v.to(self.device)
        ks, vs = (
            self.all_gather(kp).reshape(-1).cpu(),
            self.all_gather(vp).reshape(-1, self.num_outputs).cpu(),
        )
        keep = ks >= 0
        return [ks[keep]], [vs[keep]]

    def _tags(self, idx: list[torch.Tensor], rows: list[torch.Tensor], ds: Any) -> list[list[str]]:
        lengths = [len(w) for w in ds.words]
        total = sum(lengths)
        if not idx:
            return [["O"] * n for n in lengths]
        k, v = torch.cat(idx), torch.cat(rows)
        first = torch.full((total,), -1, dtype=torch.long)
        first[k] = torch.arange(len(k))  # a word gathered twice (DDP padding) keeps one row
        keep = first[first >= 0]
        logits = merge([k[keep]], [v[keep]], total)
        tags, _ = word_tags(logits, self.class_names)
        return split_by_sentence(tags, lengths)

    # ------------------------------------------------------------------ tl eval
    def check_classes(self, got: list[str], where: str) -> None:
        """Other data may hold other entity types: they are scored (as missed), with a warning."""
        theirs = {t.split("-", 1)[1] for t in got if t != "O"}
        extra = sorted(theirs - set(self.types))
        if extra:
            warn(
                f"{where}: entity type(s) the model never learned: {', '.join(extra)}; they are "
                "scored as missed entities"
            )

    @torch.inference_mode()
    def evaluate(self, loader: Any, device: torch.device, desc: str) -> Evaluation:
        self.to(device).eval()
        ds = loader.dataset
        idx, rows = [], []
        with progress(desc, total=len(loader)) as advance:
            for x, y in loader:
                out = self(move_data_to_device(x, device)).float().cpu()
                k, v = gather_words(out, y["word_index"])
                idx.append(k)
                rows.append(v)
                advance()
        total = sum(len(w) for w in ds.words)
        logits = merge(idx, rows, total) if idx else torch.zeros(0, self.num_outputs)
        bad_words = ~torch.isfinite(logits).all(dim=1)
        lengths = [len(w) for w in ds.words]
        bad = sum(1 for b in split_by_sentence(bad_words.tolist(), lengths) if any(b))
        tags, probs = word_tags(logits.nan_to_num(0.0), self.class_names)
        pred = split_by_sentence(tags, lengths)
        ev = infer.evaluation(ds.words, ds.gold, pred, self.types, ERROR_ROWS)
        m = ev["metrics"]
        metrics = {
            **{k: m[k] for k in ("f1", "precision", "recall", "macro_f1", "token_acc")},
            "per_type": m["per_type"],
            "tag_scheme": self.tag_scheme,
            "num_entities": sum(r["support"] for r in m["per_type"].values()),
            "num_words": total,
            "confusion": ev["confusion"],
            "error_kinds": ev["error_kinds"],
        }
        return Evaluation(metrics, len(ds.words), {"errors": ev["errors"], "ev": ev}, bad)

    def evaluation_outputs(
        self, ev: Evaluation, out: Path, dataset: Any, cfg: Any, split: str, noun: str
    ) -> EvalOutputs:
        """errors.jsonl (the sentences with the most wrong spans) and the report sections."""
        errors = ev.details["errors"]
        path = out / "errors.jsonl"
        write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in errors))
        k = ev.metrics["error_kinds"]
        wrong = sum(v for key, v in k.items() if key != "correct")
        return EvalOutputs(
            report=[*infer.report_lines(ev.details["ev"], self.tag_scheme), ""],
            lines=[
                f"{k['correct']} entities right, {wrong} span errors ({k['missed']} missed, "
                f"{k['spurious']} spurious, {k['wrong_type']} wrong type, "
                f"{k['wrong_boundaries'] + k['wrong_both']} wrong boundaries); worst sentences: "
                f"{path}"
            ],
            files={"errors": str(path)},
        )

    def show_evaluation(self, ev: Evaluation, split: str, noun: str) -> None:
        from rich.table import Table

        from tl_cli.core.console import fmt

        t = Table(
            title=f"entities per type ({split}, {ev.num_samples} {noun})", header_style="bold"
        )
        for col in ("type", "precision", "recall", "f1", "support"):
            t.add_column(col, justify="left" if col == "type" else "right")
        for name, r in ev.metrics["per_type"].items():
            t.add_row(name, fmt(r["precision"]), fmt(r["recall"]), fmt(r["f1"]), str(r["support"]))
        show(t)

    # ------------------------------------------------------------------ tl export
    def export_spec(self, modality: Any, prep: dict[str, Any]) -> ExportSpec:
        n = len(self.class_names)
        return ExportSpec(
            net=TokenTagger(self.backbone, self.head, modality.pack).eval(),
            output_names=["logits"],
            output_axes={"logits": {0: "batch", 1: "tokens"}},
            sidecar={
                "class_names": list(self.class_names),
                "num_classes": n,
                "tags": list(self.class_names),
                "tag_scheme": schemes.INTERNAL,
                "data_tag_scheme": self.tag_scheme,
                "output": {
                    "name": "logits",
                    "shape": ["batch", "tokens", n],
                    "note": (
                        "token logits over `tags`; a word's tag is the arg-max at its first "
                        "sub-token; spans are decoded from the word tags (BIO) by the conlleval "
                        "rules (seqeval's default mode)"
                    ),
                },
            },
        )

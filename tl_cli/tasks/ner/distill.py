"""``tl distill`` with a NER teacher: a token-level student (Hinton et al., 2015, per word).

The KD loss of ``tl_cli.tasks.distill`` is applied at the positions the NER loss uses, each
word's first sub-token: ``alpha * T^2 * KL(p_teacher || p_student) + (1 - alpha) * CE(student,
gold tag)``, averaged over the words of the batch. The teacher (the NER checkpoint's encoder and
token head) runs on every training batch: its windows are the student's (same tokenizer, a rule
``tl distill`` checks), so its logits line up position by position. The student is an ordinary
``ner`` task in every other respect: windows, ``val/f1`` for best.ckpt, seqeval scores; its
checkpoint is an ordinary ``ner`` checkpoint (``tl eval``, ``predict``, ``export`` unchanged).
metrics.json adds ``teacher/test/f1``, the teacher's entity F1 on the same test windows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tl_cli.tasks.distill import DISTILLERS, Student, kd_loss
from tl_cli.tasks.ner import infer, io, metrics
from tl_cli.tasks.ner.align import IGNORE, gather_words
from tl_cli.tasks.ner.model import TokenTagger
from tl_cli.tasks.ner.task import NerTask

#: where the teacher's test-window outputs are gathered (beside the student's "test")
TEACHER = "teacher_test"


@DISTILLERS.register("ner")
class NerDistillTask(Student, NerTask):
    """A NER student trained on a frozen NER teacher's per-word tag distributions."""

    teacher_metric = "f1"

    @staticmethod
    def teacher_net(teacher: Any) -> nn.Module:
        return TokenTagger(teacher.backbone, teacher.head)

    def student_net(self) -> nn.Module:
        return TokenTagger(self.backbone, self.head)

    def unlabeled_rows(self, root: Any) -> list[Any]:
        """Sentences without tags: every word takes the KD term only (label ``UNLABELLED``)."""
        return [(s, -1) for s in io.read_unlabeled(root)]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self.outputs(x)
        labels = y["labels"]
        words = labels != IGNORE  # each word's first sub-token, as the NER loss
        # (an unlabelled sentence's words are UNLABELLED (-1): kd_loss takes no CE on them)
        with torch.no_grad():
            t = self.teacher(self.teacher_input(x)).float()
        if bool(words.any()):
            loss, kl, ce = kd_loss(
                out[words], t[words], labels[words], self.temperature, self.alpha,
                self.label_smoothing,
            )  # fmt: skip
        else:  # a batch of windows without a word to score: zero, with a graph
            loss = kl = ce = out.sum() * 0.0
        if self.policy.l2sp_alpha:
            loss = loss + self.policy.l2sp_alpha * self.policy.l2sp_penalty()
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train/kd", kl, on_step=False, on_epoch=True, sync_dist=True)
        self.log("train/ce", ce, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    # -- the teacher's score on the test windows, beside the student's
    def _eval_step(self, batch: Any, stage: str) -> None:
        super()._eval_step(batch, stage)
        if stage == "test" and self.has_teacher:
            x, y = batch
            with torch.no_grad():
                t = self.teacher(self.teacher_input(x)).float().cpu()
            idx, rows = gather_words(t, y["word_index"].cpu())
            self._words.setdefault(TEACHER, ([], []))
            self._words[TEACHER][0].append(idx)
            self._words[TEACHER][1].append(rows)

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._words[TEACHER] = ([], [])

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        ds = getattr(self.trainer.test_dataloaders, "dataset", None)
        if not self.has_teacher or getattr(ds, "gold", None) is None:
            return
        idx, rows = self._gather(*self._words.get(TEACHER, ([], [])))
        f1 = metrics.score(ds.gold, self._tags(idx, rows, ds))["f1"]
        self.log("teacher/test/f1", float(f1))

    @torch.inference_mode()
    def score_teacher(self, dm: Any, split: str) -> float:
        device = next(self.teacher.parameters()).device
        words = dm.words(split)
        tags, _ = infer.tag_words(
            self.teacher, dm.aligner, dm.preprocessing["pad_id"], words, self.class_names,
            device=device,
        )  # fmt: skip
        return float(metrics.score(dm.gold(split), tags)["f1"])

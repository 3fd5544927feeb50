"""Knowledge distillation as a task (Hinton et al., 2015): a student trained on a frozen teacher's
softened outputs (`tl distill` builds it: ``tl_cli.commands.distill``).

* **Students by task**: :class:`Student` holds what every student shares (the frozen teacher,
  the KD settings, checkpoints without the teacher); ``DISTILLERS`` maps a teacher's task to its
  student class: ``classification`` -> :class:`DistillTask` (below), ``ner`` -> a token-level
  student (``tl_cli.tasks.ner.distill``).

* **Teacher**: held as the ``teacher`` submodule, listed in ``DistillTask.frozen``: the transfer
  policy never gives it to the optimizer, its BatchNorm and dropout stay in eval mode and it runs
  under ``no_grad``. Its weights are stripped from every checkpoint the run writes.
* **Loss** (per batch): ``alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) *
  CE(s, y)``: alpha weighs the soft targets, T^2 keeps their gradients on the CE scale
  (Hinton et al., 2015, section 2). The KL term averages over every input of the batch, the CE
  term over the labelled ones only (label -1: soft targets only).
* **Cache**: with a frozen student backbone the feature cache stores the student's features and
  the teacher's logits side by side, in one pass over the same inputs; otherwise the teacher runs
  on every batch (or its logits are cached once: :class:`TeacherLogitData`).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from tl_cli.core.registry import Registry
from tl_cli.tasks.base import TransferTask, cached
from tl_cli.tasks.classification import ClassificationTask

#: ``distill.temperature=auto`` / ``distill.alpha=auto`` (configs/distill.yaml), by the teacher's
#: modality; docs/distillation.md says why and shows the measurements
DEFAULT_TEMPERATURE = 4.0


DEFAULT_ALPHA = 0.9


KD_DEFAULTS = {"text": (2.0, 0.5)}


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    y: torch.Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
    class_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hinton's knowledge-distillation loss: (total, KL term, CE term).

    ``alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(student, y)`` with ``p = softmax(logits / T)``.
    The KL is averaged over all rows; the CE over rows with a label (``y >= 0``; an unlabelled row
    has ``y = -1`` and contributes to the KL term only). A batch without labels has CE = 0.
    """
    t = float(temperature)
    log_ps = F.log_softmax(student.float() / t, dim=1)
    log_pt = F.log_softmax(teacher.float() / t, dim=1)
    kl = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
    labelled = y >= 0
    if bool(labelled.any()):
        ce = F.cross_entropy(
            student[labelled].float(),
            y[labelled],
            weight=class_weight,
            label_smoothing=label_smoothing,
        )
    else:
        ce = student.sum() * 0.0
    return alpha * t * t * kl + (1.0 - alpha) * ce, kl, ce


class TeacherNet(nn.Module):
    """The teacher's backbone + head (from its checkpoint): raw inputs -> logits."""

    def __init__(self, task: nn.Module) -> None:
        super().__init__()
        self.backbone = task.backbone
        self.head = task.head

    def forward(self, x: Any) -> torch.Tensor:
        return self.head(self.backbone(x))


class ImageAdapter(nn.Module):
    """Student-normalised images -> the teacher's normalisation and input size (identity if equal)."""

    def __init__(self, student: dict[str, Any], teacher: dict[str, Any]) -> None:
        super().__init__()

        def vec(p: dict[str, Any], k: str) -> torch.Tensor:
            return torch.tensor([float(v) for v in p[k]]).view(1, 3, 1, 1)

        self.register_buffer("s_mean", vec(student, "mean"), persistent=False)
        self.register_buffer("s_std", vec(student, "std"), persistent=False)
        self.register_buffer("t_mean", vec(teacher, "mean"), persistent=False)
        self.register_buffer("t_std", vec(teacher, "std"), persistent=False)
        self.size = int(teacher["input_size"])
        self.identity = (
            list(student["mean"]) == list(teacher["mean"])
            and list(student["std"]) == list(teacher["std"])
            and int(student["input_size"]) == self.size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x
        x = (x * self.s_std + self.s_mean - self.t_mean) / self.t_std
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
            )
        return x


class PairedExtractor(nn.Module):
    """For the feature cache: ``[student features | teacher logits]`` of the same inputs."""

    def __init__(self, task: DistillTask) -> None:
        super().__init__()
        self.backbone = task.backbone
        self.teacher = task.teacher
        self.teacher_input = task.teacher_input
        self.num_features = task.backbone.num_features + task.num_outputs

    def forward(self, x: Any) -> torch.Tensor:
        s = self.backbone(x)
        t = self.teacher(self.teacher_input(x)).to(s.dtype)
        return torch.cat([s, t], dim=1)


#: teacher checkpoint's task name -> the student task class that distils it (``tl distill``
#: reads it; a task package registers its own: ``tl_cli.tasks.ner.distill``)
DISTILLERS: Registry[Any] = Registry("distillation teacher task")


class Student:
    """What a student shares whatever its task: a frozen teacher beside it, KD settings,
    checkpoints of the student alone. Mixed in before the task class (``class
    DistillTask(Student, ClassificationTask)``), so the student is that task in every other
    respect and its checkpoint is an ordinary one of that task.

    A task's student adds: ``teacher_net`` (the teacher module's inputs -> outputs network),
    ``student_net`` (what is timed against it), its training step with the KD loss,
    ``teacher/test/<teacher_metric>`` logged at test, and :meth:`score_teacher`.
    """

    frozen = ("teacher", "teacher_input")
    #: the teacher's score on the run's data is ``teacher/test/<this>`` (and ``<this>_ratio``
    #: the student's over the teacher's)
    teacher_metric = "acc"

    @staticmethod
    def teacher_net(teacher: Any) -> nn.Module:
        """The teacher task module -> the network of its raw outputs (no metrics, no loaders)."""
        return TeacherNet(teacher)

    def student_net(self) -> nn.Module:
        """The student's network from inputs to outputs (timed against the teacher's)."""
        return nn.Sequential(self.backbone, self.head)

    def attach_teacher(
        self,
        teacher: nn.Module,
        teacher_input: nn.Module,
        temperature: float,
        alpha: float,
        info: dict[str, Any] | None = None,
    ) -> None:
        from tl_cli.transfer.policy import TransferPolicy

        self.teacher = teacher
        self.teacher_input = teacher_input
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.distill_info = dict(info or {})
        self.teacher_metrics()
        # the plan again, now with the teacher as a never-trained submodule
        self.policy = TransferPolicy(self.strategy, self, frozen=self.frozen)
        self.policy.apply(0)

    def unlabeled_rows(self, root: Any) -> list[Any] | None:
        """``dataset.unlabeled_root``'s inputs as training rows ``(input, -1)`` (soft targets
        only); None: the modality's inputs (``tl distill`` reads them)."""
        return None

    def teacher_metrics(self) -> None:
        """Build what scores the teacher at test (called once the teacher is attached)."""

    def score_teacher(self, dm: Any, split: str) -> float:
        """The teacher's ``teacher_metric`` on ``split`` of ``dm`` (when there is no test split)."""
        raise NotImplementedError  # pragma: no cover

    @property
    def task_name(self) -> str:
        """The registered task the student belongs to: its checkpoint is an ordinary one."""
        from tl_cli.tasks.base import TASKS

        for cls in type(self).__mro__:
            name = next((n for n in TASKS.names() if TASKS.get(n) is cls), None)
            if name is not None:
                return name
        return type(self).__name__  # pragma: no cover

    head_only_as_feature_extraction = False  # one head throughout (not measured for students)

    def auto_lr_mults(self) -> tuple[float, float, str]:
        """A student keeps the fine-tuning LRs its benchmarks were measured with (backbone
        ``x 0.1``, head ``x 1.0``; docs/distillation.md): it learns the teacher's soft targets
        on top of its labels, a new objective rather than a start at the labels' optimum, and
        the lower LRs of an image classifier (issue 24) were not measured for it."""
        return TransferTask.auto_lr_mults(self)

    @property
    def has_teacher(self) -> bool:
        return "teacher" in self._modules

    def train(self, mode: bool = True) -> Any:
        super().train(mode)
        if self.has_teacher:
            self.teacher.eval()  # dropout and BatchNorm of the teacher: always inference
        return self

    # -- checkpoints: the student only
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        sd = checkpoint.get("state_dict", {})
        for k in [k for k in sd if k.split(".", 1)[0] in self.frozen]:
            del sd[k]
        checkpoint["tl"]["distilled_from"] = dict(getattr(self, "distill_info", {}))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.has_teacher and isinstance(checkpoint.get("state_dict"), dict):
            # resume / test(ckpt_path=best): the teacher's weights are not in the file
            for k, v in self.teacher.state_dict().items():
                checkpoint["state_dict"].setdefault(f"teacher.{k}", v)


@DISTILLERS.register("classification")
class DistillTask(Student, ClassificationTask):
    """A classification student trained by knowledge distillation from a frozen teacher.

    Built like a ClassificationTask (same hyper-parameters, so its checkpoint is an ordinary
    ``classification`` one); :meth:`attach_teacher` adds the teacher and the KD settings.
    """

    def teacher_metrics(self) -> None:
        self.teacher_test_acc = MulticlassAccuracy(self.num_outputs, average="micro")

    @torch.inference_mode()
    def score_teacher(self, dm: Any, split: str) -> float:
        from lightning_fabric.utilities.apply_func import move_data_to_device

        from tl_cli.core.console import progress

        device = next(self.teacher.parameters()).device
        loader = dm.make_loader(dm.dataset(split, train_aug=False), shuffle=False)
        correct = total = 0
        with torch.inference_mode(), progress(f"teacher on {split}", len(loader)) as advance:
            for x, y in loader:
                x = move_data_to_device(x, device)
                pred = self.teacher(self.teacher_input(x)).argmax(1).cpu()
                correct += int((pred == y).sum())
                total += len(y)
                advance()
        return correct / max(1, total)

    # -- inputs
    def cache_extractor(self) -> nn.Module:
        """What the feature cache runs: student features and teacher logits together."""
        return PairedExtractor(self)

    def uncached_data(self, dm: Any) -> Any:
        """Un-augmented inputs and a student that trains: the teacher's logits computed once."""
        augmented = self.backbone.modality != "text" and getattr(dm, "augment", None) not in (
            None,
            "none",
            False,
        )
        if augmented or getattr(dm, "balance", None) == "sampler":
            return dm  # every batch is a new view: the teacher labels it on the fly
        return TeacherLogitData(dm, self)

    def features(self, x: Any) -> torch.Tensor:
        if isinstance(x, dict) and "teacher_logits" in x:
            x = x["inputs"]
        f = cached(x)
        if f is None:
            return self.backbone(x)
        return f[:, : self.backbone.num_features]

    def teacher_logits(self, x: Any) -> torch.Tensor:
        if isinstance(x, dict) and "teacher_logits" in x:
            return x["teacher_logits"].float()
        f = cached(x)
        if f is not None and f.shape[1] > self.backbone.num_features:
            return f[:, self.backbone.num_features :].float()
        if f is not None:
            raise RuntimeError("cached features without the teacher's logits")
        with torch.no_grad():
            return self.teacher(self.teacher_input(x)).float()

    def train_features(self):
        feats, labels = super().train_features()
        keep = labels >= 0  # the head fit sees labelled inputs only
        return feats[keep][:, : self.backbone.num_features], labels[keep]

    def fit_head(self) -> None:
        super().fit_head()
        self.head_converged = False  # the head keeps learning from the teacher

    # -- steps
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self.outputs(x)
        t = self.teacher_logits(x)
        cw = None if self.class_weight is None else self.class_weight.to(out.device, torch.float32)
        loss, kl, ce = kd_loss(
            out, t, y, self.temperature, self.alpha, self.label_smoothing, class_weight=cw
        )
        if self.policy.l2sp_alpha:
            loss = loss + self.policy.l2sp_alpha * self.policy.l2sp_penalty()
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train/kd", kl, on_step=False, on_epoch=True, sync_dist=True)
        self.log("train/ce", ce, on_step=False, on_epoch=True, sync_dist=True)
        labelled = y >= 0
        if bool(labelled.any()):
            self.update_metrics(out[labelled], y[labelled], "train")
        return loss

    def _eval_step(self, batch: Any, stage: str) -> None:
        super()._eval_step(batch, stage)
        if stage == "test":
            x, y = batch
            self.teacher_test_acc(self.teacher_logits(x), y)
            self.log("teacher/test/acc", self.teacher_test_acc, on_step=False, on_epoch=True)


def kd_settings(
    temperature: float | None, alpha: float | None, modality: str
) -> tuple[float, float]:
    """The KD temperature and alpha, ``auto`` (None) filled in from the teacher's modality."""
    t, a = KD_DEFAULTS.get(modality, (DEFAULT_TEMPERATURE, DEFAULT_ALPHA))
    return (t if temperature is None else temperature), (a if alpha is None else alpha)


class TeacherOnInputs(nn.Module):
    """Raw inputs -> the teacher's logits (what the logit cache extracts)."""

    def __init__(self, task: DistillTask) -> None:
        super().__init__()
        self.teacher = task.teacher
        self.teacher_input = task.teacher_input
        self.num_features = task.num_outputs

    def forward(self, x: Any) -> torch.Tensor:
        return self.teacher(self.teacher_input(x))


class _WithLogits(torch.utils.data.Dataset):
    def __init__(self, ds: Any, logits: Any) -> None:
        self.ds, self.logits = ds, logits

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        x, y = self.ds[i]
        return x, y, torch.from_numpy(self.logits[i].copy())


class _CollateWithLogits:
    def __init__(self, base: Any) -> None:
        self.base = base or torch.utils.data.default_collate

    def __call__(self, rows: list[Any]):
        x, y = self.base([(r[0], r[1]) for r in rows])
        return {"inputs": x, "teacher_logits": torch.stack([r[2] for r in rows])}, y


class TeacherLogitData(pl.LightningDataModule):
    """Un-augmented inputs with the teacher's logits, computed once per split (``setup``, inside
    fit, on the trainer's device, sharded under DDP) by the feature cache's ``extract``."""

    def __init__(self, dm: Any, module: DistillTask) -> None:
        super().__init__()
        self.inner = dm
        self.module = module
        self.logits: dict[str, Any] = {}

    # what tl_cli.commands.train and the head fit read from a data module
    def __getattr__(self, name: str) -> Any:
        if name in ("splits", "dataset", "make_loader", "batch_size", "has_split", "class_names"):
            return getattr(self.__dict__["inner"], name)
        raise AttributeError(name)

    def setup(self, stage: str | None = None) -> None:
        from tl_cli.data.features import extract

        if self.logits:
            return
        device = (
            self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        )
        net = TeacherOnInputs(self.module)
        was = next(net.parameters()).device
        net.to(device)
        try:
            for split in self.inner.splits:
                ds = self.inner.dataset(split, train_aug=False)
                self.logits[split], _ = extract(
                    net, ds, self.inner, device, f"caching {split} teacher logits"
                )
        finally:
            net.to(was)

    def _loader(self, split: str, shuffle: bool) -> Any:

        dm = self.inner
        base = dm.dataset(split, train_aug=False)
        ds = _WithLogits(base, self.logits[split])
        return dm.make_loader(ds, shuffle, collate_fn=_CollateWithLogits(dm.collate_fn(base)))

    def train_dataloader(self) -> Any:
        return self._loader("train", True)

    def val_dataloader(self) -> Any:
        return self._loader("val", False)

    def test_dataloader(self) -> Any:
        return self._loader("test", False)

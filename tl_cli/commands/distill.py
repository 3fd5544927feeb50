"""`tl distill`: train a small student on a trained teacher's softened outputs (Hinton et al., 2015).

    tl distill teacher=RUN/checkpoints/best.ckpt [backbone=STUDENT | backbone.depth=K]
               [dataset.*] [dataset.unlabeled_root=DIR] [distill.temperature=T] [distill.alpha=A]

* **Teacher**: loaded only through the checkpoint loader (validated, rebuilt by registry name);
  a classification or NER checkpoint. The student task (``tl_cli.tasks.distill.DISTILLERS``:
  ``DistillTask`` for classification, ``NerDistillTask`` for NER, token-level KD on each word's
  first sub-token) holds it frozen and strips it from checkpoints.
* **Data**: the teacher's own dataset (its checkpoint stores the dataset config with absolute
  roots) unless the command line names ``dataset=...`` or ``dataset.<key>=...`` (then those keys
  replace the stored ones). The class names must be the teacher's, in the same order.
* **Student**: without ``backbone=...`` the teacher's own backbone cut to its first half
  (``backbone.depth``, DistilBERT-style), the kept blocks starting from the teacher's fine-tuned
  weights; with ``backbone=NAME`` any backbone of the same modality (pretrained weights).
* The student's checkpoint is an ordinary checkpoint of the teacher's task: ``tl eval``,
  ``predict`` and ``export`` use it unchanged. metrics.json adds ``teacher/test/acc`` (NER:
  ``teacher/test/f1``) and the keys of :data:`tl_cli.core.metrics.DISTILL_METRICS` (parameters,
  CPU latency, ratios).
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from tl_cli.core.errors import TLError
from tl_cli.core.registry import plain
from tl_cli.modalities.backbones import count_params
from tl_cli.run import gates as tl_gates
from tl_cli.tasks.distill import (
    DISTILLERS,
    ImageAdapter,
    Student,
    TeacherLogitData,
    kd_settings,
)

# --------------------------------------------------------------------------- the run


def _override_keys(overrides: list[str]) -> set[str]:
    keys = set()
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        keys.add(key)
    return keys


def _hydra_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - composed outside a Hydra app (tests, API)
        return []


def load_teacher(path: Any) -> tuple[Any, dict[str, Any]]:
    """The teacher task module (eval mode) and its validated checkpoint."""
    from tl_cli.tasks.loading import load_module

    if path is None or str(path) in ("", "None", "???"):
        raise TLError("teacher is not set: tl distill teacher=RUN/checkpoints/best.ckpt")
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        cand = p / "checkpoints" / "best.ckpt"
        p = cand if cand.is_file() else p / "best.ckpt"
    try:
        module, ckpt = load_module(p)
    except TLError as e:
        msg = str(e)
        raise TLError(
            msg.replace("checkpoint=", "teacher=", 1)
            if msg.startswith("checkpoint=")
            else f"teacher={p}: {msg}"
        ) from None
    if ckpt["tl"].get("task") not in DISTILLERS:
        raise TLError(
            f"teacher={p}: a {ckpt['tl'].get('task')!r} checkpoint; tl distill takes a "
            f"{' or '.join(repr(n) for n in DISTILLERS.names())} teacher"
        )
    from tl_cli.run.safety import first_nonfinite

    bad = first_nonfinite(module.state_dict())
    if bad is not None:  # else its NaN logits surface as the student's NaN loss, blamed on the LR
        raise TLError(
            f"teacher={p}: its weight {bad} is not finite (a corrupt or diverged checkpoint)"
        )
    for q in module.parameters():
        q.requires_grad_(False)
    return module, {**ckpt, "path": str(p.resolve())}


def blocks_of(backbone: nn.Module) -> int | None:
    """How many blocks ``backbone.depth`` can keep (EfficientNet blocks, transformer layers)."""
    m = getattr(backbone, "model", None)
    blocks = getattr(m, "blocks", None)
    if type(m).__name__ == "EfficientNet" and isinstance(blocks, nn.Sequential):
        return sum(len(s) for s in blocks)
    for path in ("encoder.layer", "transformer.layer", "encoder.layers", "layers", "layer"):
        try:
            sub = m.get_submodule(path) if m is not None else None
        except AttributeError:
            continue
        if isinstance(sub, nn.ModuleList) and len(sub):
            return len(sub)
    return None


def resolve_dataset(cfg: DictConfig, stored: Any, keys: set[str]) -> dict[str, Any]:
    """The teacher's stored dataset config, with the command line's dataset keys applied."""
    composed = dict(plain(cfg.dataset) or {})
    if "dataset" in keys or not isinstance(stored, dict):
        return composed
    out = dict(stored)
    for k in keys:
        if k.startswith("dataset."):
            top = k.split(".")[1]
            if top in composed:
                out[top] = composed[top]
    out.setdefault("unlabeled_root", composed.get("unlabeled_root"))
    if out.get("root"):
        from tl_cli.core.checkpoint import stored_path

        if "dataset.root" not in keys:
            stored_path(out["root"], "dataset.root", cfg.get("teacher"))
    return out


def resolve_student(
    cfg: DictConfig, teacher: Any, teacher_hp: dict[str, Any], keys: set[str]
) -> tuple[dict[str, Any], bool]:
    """(student backbone config, whether its kept blocks start from the teacher's weights)."""
    composed = dict(plain(cfg.backbone) or {})
    own = "backbone" in keys or any(
        k in keys for k in ("backbone.name", "backbone.source", "backbone.path")
    )
    if own:
        return composed, False
    out = dict(teacher_hp["backbone"])
    for k in keys:
        if k.startswith("backbone."):
            top = k.split(".")[1]
            if top in composed:
                out[top] = composed[top]
    if "backbone.depth" not in keys or out.get("depth") is None:
        n = blocks_of(teacher.backbone)
        if n is None:
            raise TLError(
                f"the teacher's backbone {teacher.backbone.name} cannot be cut (backbone.depth); "
                "pick a student: tl distill teacher=... backbone=NAME"
            )
        out["depth"] = max(1, n // 2)
    return out, True


def unlabeled_items(root: Any, modality: str) -> list[Any]:
    """Every input the task reads under ``root`` (flat or class folders; folder names ignored)."""
    from tl_cli.modalities.base import modality_of

    p = Path(os.path.expanduser(str(root)))
    if not p.exists():
        raise TLError(f"dataset.unlabeled_root={root} does not exist")
    try:
        if modality == "text":
            from tl_cli.modalities.text.files import TextItem
            from tl_cli.modalities.text.modality import TextModality

            if p.is_dir():
                found = sorted(
                    f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                )
                txt = [f for f in found if f.suffix.lower() == ".txt"]
                tables = [f for f in found if f.suffix.lower() in (".csv", ".tsv", ".jsonl")]
                texts = [f.read_text(errors="replace") for f in txt]
                texts = [t for t in texts if t.strip()]
                if tables:
                    texts += TextModality().find([str(f) for f in tables])
            else:
                texts = TextModality().find(str(p))
            items: list[Any] = [TextItem(str(t)) for t in texts]
        else:
            items = [str(x) for x in modality_of({"modality": modality}).find(str(p))]
    except TLError as e:
        raise TLError(f"dataset.unlabeled_root={root}: {str(e).split(': ', 1)[-1]}") from None
    if not items:
        raise TLError(f"dataset.unlabeled_root={root}: no inputs found")
    return items


def _make_build(
    cfg: DictConfig,
    teacher: Any,
    tckpt: dict[str, Any],
    student_bb: dict[str, Any],
    from_teacher: bool,
    dataset: dict[str, Any],
    unlabeled_root: Any,
):
    from tl_cli.data.base import DATASETS
    from tl_cli.run.training import stored_dataset_config

    def build(scfg: DictConfig):
        dm = DATASETS.build(dataset)
        dm.prepare()
        _check_classes(dm, teacher, tckpt)
        task = DISTILLERS.get(tckpt["tl"]["task"])(
            backbone=student_bb,
            head=plain(scfg.head),
            strategy=plain(scfg.strategy),
            optimizer=plain(scfg.optimizer),
            scheduler=plain(scfg.scheduler),
            class_names=dm.class_names,
            preprocessing_overrides=dm.preprocessing_overrides(),
            label_smoothing=scfg.get("label_smoothing", 0.0),
            pretrained=not from_teacher,
        )
        modality = task.backbone.modality
        if modality != teacher.backbone.modality:
            raise TLError(
                f"backbone {task.backbone.name} reads {modality}; the teacher reads "
                f"{teacher.backbone.modality}: pick a {teacher.backbone.modality} student"
            )
        if from_teacher:
            _load_teacher_backbone(task, teacher)
        adapter = _teacher_input(task, teacher, modality)
        n_unlab = _add_unlabelled(task, dm, unlabeled_root, modality)
        temperature, alpha = kd_settings(*_check_kd(scfg), teacher.backbone.modality)
        task.attach_teacher(
            task.teacher_net(teacher),
            adapter,
            temperature,
            alpha,
            info={
                "teacher": tckpt["path"],
                "teacher_backbone": teacher.backbone.name,
                "temperature": temperature,
                "alpha": alpha,
                "student_init": "teacher" if from_teacher else "pretrained",
                "unlabeled_size": n_unlab,
            },
        )
        ds_store = {k: v for k, v in dataset.items() if k != "unlabeled_root"}
        task.dataset_config = stored_dataset_config(ds_store)
        dm.set_preprocessing(task.preprocessing)
        _balance(task, dm, n_unlab)
        return task, dm

    return build


def _check_classes(dm: Any, teacher: Any, tckpt: dict[str, Any]) -> None:
    """A student learns the teacher's classes: the data's must be the same, in order."""
    t_names = list(teacher.class_names)
    if list(dm.class_names) != t_names:
        missing = [c for c in t_names if c not in dm.class_names]
        extra = [c for c in dm.class_names if c not in t_names]
        detail = (f"missing {', '.join(missing[:5])}" if missing else "") + (
            f"{'; ' if missing else ''}extra {', '.join(extra[:5])}" if extra else ""
        )
        raise TLError(
            f"dataset classes differ from the teacher's (teacher={tckpt['path']}): "
            + (detail or "same names in another order")
            + "; a student learns the teacher's classes: use the teacher's dataset or one with its class folders"
        )


def _load_teacher_backbone(task: Any, teacher: Any) -> None:
    """``student_init=teacher``: the student backbone starts from the teacher's own weights."""
    tsd = teacher.backbone.state_dict()
    ssd = task.backbone.state_dict()
    bad = [k for k in ssd if k not in tsd or tsd[k].shape != ssd[k].shape]
    if bad:
        raise TLError(f"the student backbone does not fit the teacher's weights (e.g. {bad[0]})")
    task.backbone.load_state_dict({k: tsd[k] for k in ssd}, strict=True)


def _teacher_input(task: Any, teacher: Any, modality: str) -> nn.Module:
    """What turns the student's batch into the teacher's input: an image adapter (another size or
    normalisation), else nothing, and then the two must read inputs the same way."""
    if modality == "image":
        adapter: nn.Module = ImageAdapter(task.preprocessing, teacher.preprocessing)
    else:
        same = {k: v for k, v in task.preprocessing.items() if k != "max_length"} == {
            k: v for k, v in teacher.preprocessing.items() if k != "max_length"
        }
        if not same:
            raise TLError(
                f"backbone {task.backbone.name} reads its {modality} inputs differently from the "
                f"teacher's {teacher.backbone.name} (tokenizer / front end): pick a student "
                "with the same one, or the teacher's own backbone with backbone.depth=K"
            )
        adapter = nn.Identity()
    return adapter


def _add_unlabelled(task: Any, dm: Any, root: Any, modality: str) -> int:
    """``dataset.unlabeled_root``'s inputs join training as rows without a label (soft
    targets only); how many."""
    n_unlab = 0
    if root:
        rows = task.unlabeled_rows(root)  # the task's own inputs (NER sentences)
        if rows is None:
            rows = [(x, -1) for x in unlabeled_items(root, modality)]
        n_unlab = len(rows)
        dm.splits["train"] = list(dm.splits["train"]) + rows
    return n_unlab


def _balance(task: Any, dm: Any, n_unlab: int) -> None:
    """``dataset.balance``: class weights from the labelled rows; no sampler with unlabelled ones."""
    task.balance = getattr(dm, "balance", None)
    if task.balance == "sampler" and n_unlab:
        raise TLError(
            "dataset.balance=sampler cannot draw unlabelled inputs by class; "
            "use dataset.balance=weights with dataset.unlabeled_root"
        )
    if task.balance == "weights":
        import numpy as np

        from tl_cli.transfer.probe import class_weights

        labels = np.asarray([y for _, y in dm.splits["train"] if y >= 0])
        task.class_weight = torch.as_tensor(
            class_weights(labels, dm.num_classes), dtype=torch.float32
        )


def _check_kd(cfg: DictConfig) -> tuple[float | None, float | None]:
    """distill.temperature / distill.alpha as numbers, None for ``auto`` (checked before any work)."""
    d = cfg.get("distill") or {}
    raw = {k: d.get(k, "auto") for k in ("temperature", "alpha")}
    out: dict[str, float | None] = {}
    for k, v in raw.items():
        if v is None or str(v).strip().lower() == "auto":
            out[k] = None
            continue
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            raise TLError(f"distill.{k}={v!r} must be a number or auto") from None
    t, a = out["temperature"], out["alpha"]
    if t is not None and not t > 0:
        raise TLError(f"distill.temperature={t} must be > 0 (1 = the raw softmax; 2-8 is usual)")
    if a is not None and not 0.0 <= a <= 1.0:
        raise TLError(
            f"distill.alpha={a} must be in [0, 1] (the weight of the teacher's soft targets)"
        )
    return t, a


def teacher_warnings(tckpt: dict[str, Any]) -> list[str]:
    """What makes this teacher a worse teacher than it could be (one line each)."""
    hp = tckpt.get("hyper_parameters") or {}
    try:
        ls = float(hp.get("label_smoothing") or 0.0)
    except (TypeError, ValueError):
        ls = 0.0
    strategy, head = hp.get("strategy") or {}, hp.get("head") or {}
    # a frozen backbone with a linear head fitted by L-BFGS (tl train's default) took no smoothed
    # step: its outputs are not smoothed, whatever label_smoothing says
    lbfgs_only = (
        strategy.get("name") == "feature_extraction"
        and strategy.get("head_fit") == "lbfgs"
        and head.get("name") == "linear"
    )
    if ls > 0 and not lbfgs_only:
        return [
            f"the teacher was trained with label_smoothing={ls:g}: smoothing erases the similarities "
            "between classes its soft targets would teach (Mueller, Kornblith, Hinton 2019); a "
            "teacher trained with label_smoothing=0 usually distils better"
        ]
    return []


# --------------------------------------------------------------------------- size and speed


def _example_batch(dm: Any, n: int) -> Any:
    """A batch of ``n`` real eval-transformed inputs (repeated if the split is smaller)."""
    split = "test" if dm.has_split("test") else "val"
    ds = dm.dataset(split, train_aug=False)
    rows = [ds[i % len(ds)] for i in range(n)]
    loader = dm.make_loader(ds, shuffle=False)
    x, _ = loader.collate_fn(rows) if loader.collate_fn else torch.utils.data.default_collate(rows)
    return x


def _batch_size(x: Any) -> int:
    return x.shape[0] if isinstance(x, torch.Tensor) else next(iter(x.values())).shape[0]


#: distill.latency -> (warm-up, timed) passes per model at batch 1 and at batch 32; off: none
LATENCY_PASSES = {
    "short": {1: (2, 7), 32: (1, 3)},
    "full": {1: (3, 15), 32: (1, 5)},
    "off": {},
}


@torch.inference_mode()
def cpu_latency_ms(
    models: list[tuple[nn.Module, Any]],
    warmup: int,
    iters: int,
    advance: Any = lambda: None,
) -> list[float]:
    """Median wall time of one forward pass per input, in ms, for each (model, input) pair.

    The models are timed in alternating rounds (A, B, A, B, ...), so a burst of load from other
    processes hits both alike and their ratio stays meaningful on a shared machine. ``advance``
    is called after every pass (progress).
    """
    for m, x in models:
        m.eval()
        for _ in range(warmup):
            m(x)
            advance()
    times: list[list[float]] = [[] for _ in models]
    for _ in range(iters):
        for i, (m, x) in enumerate(models):
            t0 = time.perf_counter()
            m(x)
            times[i].append(time.perf_counter() - t0)
            advance()
    out = []
    for (_, x), ts in zip(models, times, strict=True):
        ts.sort()
        out.append(1000.0 * ts[len(ts) // 2] / _batch_size(x))
    return out


def latency_mode(cfg: DictConfig) -> str:
    """``distill.latency``: short (default), full or off; checked before any work."""
    mode = str((cfg.get("distill") or {}).get("latency", "short")).lower()
    if mode not in LATENCY_PASSES:
        raise TLError(
            f"distill.latency={mode!r} must be one of {', '.join(LATENCY_PASSES)} (short: "
            "7 timed passes at batch 1 and 3 at batch 32; full: 15 and 5; off: not measured)"
        )
    return mode


def size_and_speed(module: Student, dm: Any, mode: str = "short") -> dict[str, Any]:
    """Parameters and measured CPU latency (batch 1 and 32) of the student and the teacher,
    with progress (a bar on a terminal, a line every 30 s in logs) and one line of results."""
    from tl_cli.core.console import progress, say

    student = copy.deepcopy(module.student_net()).cpu()
    teacher = copy.deepcopy(module.teacher).cpu()
    adapter = copy.deepcopy(module.teacher_input).cpu()
    out: dict[str, Any] = {
        "student_params": count_params(student),
        "teacher_params": count_params(teacher),
    }
    plan = LATENCY_PASSES[mode]
    if plan:
        total = sum(2 * (w + n) for w, n in plan.values())
        with progress("CPU latency of student and teacher (distill.latency=off skips it)", total) as advance:  # fmt: skip
            for b, (warm, iters) in plan.items():
                x = _example_batch(dm, b)
                with torch.inference_mode():
                    xt = adapter(x) if isinstance(x, torch.Tensor) else x
                s_ms, t_ms = cpu_latency_ms([(student, x), (teacher, xt)], warm, iters, advance)
                out[f"student_latency_ms_b{b}"] = round(s_ms, 3)
                out[f"teacher_latency_ms_b{b}"] = round(t_ms, 3)
                out[f"speedup_b{b}"] = round(t_ms / max(s_ms, 1e-9), 3)
        say(
            "[bold]latency[/] on CPU, ms per input: student "
            + ", ".join(f"{out[f'student_latency_ms_b{b}']:.2f} ms (batch {b})" for b in plan)
            + "; teacher "
            + ", ".join(f"{out[f'teacher_latency_ms_b{b}']:.2f} ms (batch {b})" for b in plan)
            + "; student "
            + ", ".join(f"{out[f'speedup_b{b}']:.1f}x faster (batch {b})" for b in plan)
        )
    out["param_ratio"] = round(out["teacher_params"] / max(1, out["student_params"]), 3)
    return out


def run(
    cfg: DictConfig, callbacks: list[pl.Callback] | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """`tl distill`: resolve teacher, data and student, train with the KD loss, write metrics.json.

    Args:
        cfg: the composed distill config.
        callbacks: extra Lightning callbacks.
        overrides: the command line's overrides (default: Hydra's), to tell which dataset and
            backbone keys the user set.
    """
    from tl_cli.core.console import say, summary_table, warn
    from tl_cli.core.metrics import DISTILL_METRICS, train_summary
    from tl_cli.core.outputs import release_run_dir, write_json
    from tl_cli.run.loggers import make_logger
    from tl_cli.run.report import train_report
    from tl_cli.run.training import describe_defaults, guard_run_dir, quiet_lightning, train

    quiet_lightning()
    keys = _override_keys(overrides if overrides is not None else _hydra_overrides())
    temperature, alpha = _check_kd(cfg)
    latency = latency_mode(cfg)
    teacher_path = None if OmegaConf.is_missing(cfg, "teacher") else cfg.get("teacher")
    out = Path(str(cfg.output_dir))
    guard_run_dir(out, cfg)
    gates = tl_gates.parse(cfg)
    teacher, tckpt = load_teacher(teacher_path)
    student_cls = DISTILLERS.get(tckpt["tl"]["task"])
    tl_gates.check_train_names(gates, student_cls.final_metrics, student_cls.gate_metrics)
    temperature, alpha = kd_settings(temperature, alpha, teacher.backbone.modality)
    teacher_notes = teacher_warnings(tckpt)
    for line in teacher_notes:
        warn(line)
    dataset = resolve_dataset(cfg, tckpt["tl"].get("dataset"), keys)
    unlabeled_root = dataset.pop("unlabeled_root", None)
    student_bb, from_teacher = resolve_student(cfg, teacher, tckpt["hyper_parameters"], keys)
    scfg = copy.deepcopy(cfg)
    with open_dict(scfg):
        scfg.dataset = {k: v for k, v in dataset.items()}
        scfg.backbone = {k: v for k, v in student_bb.items() if k not in ("config", "tokenizer")}
        scfg.task = {"name": tckpt["tl"]["task"]}  # the student's task is the teacher's
        kd = OmegaConf.to_container(scfg.distill) if scfg.get("distill") else {}
        scfg.distill = {**kd, "temperature": temperature, "alpha": alpha}
    init = "the teacher's first blocks" if from_teacher else "its pretrained weights"
    say(
        f"[bold]teacher[/] {teacher.backbone.name} ({count_params(teacher) / 1e6:.2f}M params) "
        f"from {tckpt['path']}; student {student_bb.get('name')}"
        + (f" depth {student_bb['depth']}" if student_bb.get("depth") else "")
        + f" from {init}; T={temperature:g}, alpha={alpha:g}"
        + (f"; unlabelled inputs from {unlabeled_root}" if unlabeled_root else "")
    )
    logger = make_logger(scfg, out)
    build = _make_build(scfg, teacher, tckpt, student_bb, from_teacher, dataset, unlabeled_root)
    metrics, objects = train(scfg, callbacks, logger, build_fn=build)
    module, dm = objects["module"], objects["datamodule"]
    info = dict(module.distill_info)
    data = objects["data"]
    info["teacher_logits"] = (
        "cached with the student's features"
        if data is not dm and not isinstance(data, TeacherLogitData)
        else "cached once (inputs not augmented)"
        if isinstance(data, TeacherLogitData)
        else "computed every batch"
    )
    n_unlab = info["unlabeled_size"]
    metrics["train_size"] = len(dm.splits["train"]) - n_unlab
    m = module.teacher_metric  # acc (classification), f1 (ner)
    if f"teacher/test/{m}" not in metrics and dm.has_split("val"):
        metrics[f"teacher/val/{m}"] = module.score_teacher(dm, "val")
    metrics.update(size_and_speed(module, dm, latency))
    key = f"test/{m}" if f"test/{m}" in metrics else f"val/{m}"
    t_score = metrics.get(f"teacher/{key}")
    if t_score:
        metrics[f"{m}_ratio"] = round(float(metrics[key]) / float(t_score), 4)
    metrics["distill"] = info
    metrics["warnings"] = teacher_notes + list(metrics.get("warnings") or [])
    metrics["gates"] = [g.as_dict() for g in tl_gates.evaluate(gates, metrics, "train")]
    if objects["trainer"].is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "metrics.json", metrics)
        train_report(out, scfg, metrics)
        release_run_dir(out)
        own = [f"teacher/test/{m}", f"{m}_ratio"]  # DISTILL_METRICS names them for acc
        rest = [k for k in DISTILL_METRICS if k not in ("teacher/test/acc", "acc_ratio")]
        summary_table(f"tl distill: {out}", metrics, [*train_summary(metrics), *own, *rest])
        say(f"[bold]defaults[/] {describe_defaults(metrics['defaults'])}")
        ckpt = out / "checkpoints" / "best.ckpt"
        say(
            f"student checkpoint {ckpt} (an ordinary tl checkpoint)\nnext: tl eval checkpoint={ckpt}"
        )
        tl_gates.print_gates(gates)
    tl_gates.enforce(gates, str(out / "metrics.json"))
    return metrics

"""Scoring a task module on data: what `tl eval` and `tl zeroshot` share.

`dataset_for` rebuilds the data a checkpoint was trained on (or reads a new ``dataset.root`` with
the modality's own reader), `pick_split` chooses what to score, and `evaluate_module` asks the task
to score it and writes eval.json, report.md and the task's plots and error analysis, then applies
the CI gates. Nothing here knows which task it runs: the task declares its metrics and outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tl_cli.core.checkpoint import stored_path
from tl_cli.core.console import say, summary_table
from tl_cli.core.errors import EXIT_FAILED, TLError
from tl_cli.core.metrics import EVAL_SCHEMA_VERSION
from tl_cli.core.outputs import claim_run_dir, release_run_dir, write_json
from tl_cli.data.base import DATASETS
from tl_cli.modalities.base import modality_of
from tl_cli.run import gates as tl_gates
from tl_cli.run.report import eval_report
from tl_cli.run.safety import first_nonfinite

#: dataset names whose ``root`` is a download cache, not the user's folder (stored as given)
DOWNLOADED_SETS = ("cifar10", "cifar100")


def dataset_for(meta: dict[str, Any], cfg: DictConfig, ckpt_path: Any = None) -> tuple[Any, bool]:
    """The checkpoint's dataset config with the user's overrides; True if root was overridden.

    The stored config is validated plain data (``tl_cli.core.checkpoint``); it is built by registry
    name. A new ``dataset.root`` uses the modality's folder dataset (images: ``imagefolder``).
    """
    dcfg = dict(meta.get("dataset") or {})
    over = {
        k: v
        for k, v in (OmegaConf.to_container(cfg.dataset, resolve=True) or {}).items()
        if v is not None
    }
    new_root = "root" in over
    if new_root:
        # how labels are read carries over (audio: label_from, label_regex, max_seconds; text: the
        # columns, token length and carve of the training file)
        keep = ("batch_size", "num_workers", "val_fraction", "split_seed")
        keep += ("label_from", "label_regex", "max_seconds")
        keep += ("text_column", "label_column", "max_length", "test_fraction")
        keep += ("stride",)  # NER windows
        folder = modality_of(meta).folder_dataset
        stored = dcfg.get("name")
        if stored in DATASETS and getattr(DATASETS.get(stored), "reads_any_root", False):
            folder = stored  # a task's own reader (NER: CoNLL/JSONL, detection boxes)
            keep += ("image_size",)  # detection: the size the detector trained at
        dcfg = {"name": folder, **{k: dcfg[k] for k in keep if k in dcfg}}
        if "carve" in DATASETS.options(folder):
            dcfg["carve"] = False  # scored whole: no val/test carve (and no per-class minimum)
    elif dcfg.get("root") is not None and dcfg.get("name") not in DOWNLOADED_SETS:
        dcfg["root"] = stored_path(dcfg["root"], "dataset.root", ckpt_path)
    if dcfg.get("name") in DOWNLOADED_SETS:
        # a checkpoint never makes tl download anything: the set must be there already
        dcfg["download"] = False
    if not dcfg:
        raise TLError("the checkpoint records no dataset; pass dataset.root=DIR")
    dcfg.update(over)
    dcfg["augment"] = "none"
    dm = DATASETS.build(dcfg)
    if new_root:  # scored whole: no val carve, so one item per class is enough
        dm.carve = False
    dm.prepare()
    return dm, new_root


def pick_split(dm: Any, split: str, new_root: bool) -> str:
    if split != "auto":
        if not dm.has_split(split):
            raise TLError(f"split={split}: the dataset has {', '.join(dm.splits)}")
        return split
    if new_root and (
        dm.layout.startswith(("class folders", "single file"))
        or not (dm.has_split("val") or dm.has_split("test"))  # train/ only: nothing carved
    ):
        # a plain folder of class folders (or one text file) given for evaluation: score all of it
        dm.splits["all"] = dm.splits["train"] + dm.splits["val"] + dm.splits.get("test", [])
        return "all"
    if dm.has_split("test"):
        return "test"
    return "val"


def evaluate_module(
    module: Any,
    checkpoint: Any,
    dm: Any,
    split: str,
    cfg: DictConfig,
    gates: list[Any],
) -> dict[str, Any]:
    """Score ``module`` on ``dm``'s ``split``; write eval.json, report.md and the task's outputs
    into ``cfg.output_dir``; print the summary; apply the gates (exit 1 after the outputs exist).
    """
    loader = dm.make_loader(dm.dataset(split, train_aug=False), shuffle=False)
    want = str(cfg.get("device", "auto"))
    device = torch.device(
        "cuda" if want in ("auto", "cuda", "gpu") and torch.cuda.is_available() else "cpu"
    )
    noun = getattr(dm, "item_noun", "inputs")
    ev = module.evaluate(loader, device, f"evaluating {split}")
    unusable = unusable_reason(module, ev)
    result = {
        "schema_version": EVAL_SCHEMA_VERSION,
        "checkpoint": str(Path(str(checkpoint)).resolve()),
        "dataset": str(getattr(dm, "root", dm.name)),
        "split": split,
        "task": module.task_name,
        "class_names": list(module.class_names),
        "tta": getattr(module, "tta", "none"),
        **ev.metrics,
        "num_samples": ev.num_samples,
    }
    if unusable:
        result["unusable"] = unusable
    result["gates"] = [g.as_dict() for g in tl_gates.evaluate(gates, result, "eval", unusable)]
    out = Path(str(cfg.output_dir))
    claim_run_dir(out, overwrite=bool(cfg.get("overwrite", False)))  # no earlier outputs; locked
    write_json(out / "eval.json", result)  # strict JSON (NaN -> null, "nonfinite": [keys])
    extra = module.evaluation_outputs(ev, out, loader.dataset, cfg, split, noun)
    eval_report(out, result, module.eval_summary, extra.report, noun)
    for line in extra.lines:
        say(line)
    release_run_dir(out)
    module.show_evaluation(ev, split, noun)
    summary_table(f"tl eval: {out / 'eval.json'}", result, list(module.eval_summary))
    tl_gates.print_gates(gates)
    tl_gates.enforce(gates, str(out / "eval.json"))  # exit 1 on a failed gate
    if unusable:  # no gates: still no success for scores of a broken model
        raise TLError(
            f"checkpoint={checkpoint}: {unusable}; its scores mean nothing (see {out / 'eval.json'})",
            exit_code=EXIT_FAILED,
        )
    return result


def unusable_reason(module: Any, ev: Any) -> str | None:
    """Why a model's outputs cannot be scored (some are NaN/inf), naming a bad weight; else None."""
    if not ev.nonfinite:
        return None
    weight = first_nonfinite(module.state_dict())
    why = (
        f"its weight {weight} is not finite (a corrupt or diverged checkpoint)"
        if weight
        else "its outputs overflowed"
    )
    return f"the model's outputs are NaN/inf for {ev.nonfinite} of {ev.num_samples} inputs ({why})"

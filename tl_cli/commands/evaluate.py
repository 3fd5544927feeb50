"""`tl eval checkpoint=PATH`: score a checkpoint on its own dataset or any image folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning_fabric.utilities.apply_func import move_data_to_device
from omegaconf import DictConfig, OmegaConf
from rich.table import Table
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from tl_cli.core.checkpoint import load_module, stored_path
from tl_cli.core.console import fmt, progress, say, show, summary_table
from tl_cli.core.errors import TLError
from tl_cli.core.metrics import EVAL_SCHEMA_VERSION, EVAL_SUMMARY
from tl_cli.core.outputs import claim_run_dir, release_run_dir, write_json
from tl_cli.data.base import DATASETS, FOLDER_DATASETS, TorchvisionDataModule
from tl_cli.run import gates as tl_gates
from tl_cli.run.report import eval_report


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
        folder = FOLDER_DATASETS.get(str(meta.get("modality", "image")), "imagefolder")
        dcfg = {"name": folder, **{k: dcfg[k] for k in keep if k in dcfg}}
        if "carve" in DATASETS.options(folder):
            dcfg["carve"] = False  # scored whole: no val/test carve (and no per-class minimum)
    elif dcfg.get("root") is not None and dcfg.get("name") not in TorchvisionDataModule.SETS:
        dcfg["root"] = stored_path(dcfg["root"], "dataset.root", ckpt_path)
    if not dcfg:
        raise TLError("the checkpoint records no dataset; pass dataset.root=DIR")
    dcfg.update(over)
    dcfg["augment"] = "none"
    dm = DATASETS.build(dcfg)
    if new_root:  # scored whole: no val carve, so one item per class is enough
        from tl_cli.commands.fewshot import use_every_item

        use_every_item(dm)
    dm.prepare()
    return dm, new_root


def check_classes(expected: list[str], got: list[str], where: str) -> None:
    if list(expected) != list(got):
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        parts = [
            f"missing {', '.join(missing)}" if missing else "",
            f"unknown to the model {', '.join(extra)}" if extra else "",
        ]
        detail = "; ".join(p for p in parts if p) or "same names in another order"
        raise TLError(f"{where}: classes differ from the checkpoint's ({detail})")


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


@torch.inference_mode()
def predict_logits(
    module: torch.nn.Module, loader: Any, device: torch.device, desc: str
) -> tuple[torch.Tensor, torch.Tensor]:
    module.to(device).eval()
    outs, ys = [], []
    with progress(desc, total=len(loader)) as advance:
        for x, y in loader:
            outs.append(module(move_data_to_device(x, device)).float().cpu())
            ys.append(torch.as_tensor(y))
            advance()
    return torch.cat(outs), torch.cat(ys)


def score(logits: torch.Tensor, y: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    n = len(class_names)
    m: dict[str, Any] = {
        "acc": float(multiclass_accuracy(logits, y, n, average="micro")),
        "macro_f1": float(multiclass_f1_score(logits, y, n, average="macro")),
        "loss": float(F.cross_entropy(logits, y)),
        "num_samples": int(y.numel()),
    }
    if n >= 5:
        m["top5_acc"] = float(multiclass_accuracy(logits, y, n, average="micro", top_k=5))
    prec = multiclass_precision(logits, y, n, average="none")
    rec = multiclass_recall(logits, y, n, average="none")
    f1 = multiclass_f1_score(logits, y, n, average="none")
    support = torch.bincount(y, minlength=n)
    m["per_class"] = {
        c: {
            "precision": float(prec[i]),
            "recall": float(rec[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, c in enumerate(class_names)
    }
    m["confusion_matrix"] = multiclass_confusion_matrix(logits, y, n).tolist()
    return m


def run(cfg: DictConfig) -> dict[str, Any]:
    if not cfg.get("checkpoint"):
        raise TLError("checkpoint is required: tl eval checkpoint=RUN/checkpoints/best.ckpt")
    gates = tl_gates.parse(cfg)  # fail_under.* / fail_over.*: a bad value fails before any work
    module, ckpt = load_module(cfg.checkpoint)
    meta = ckpt["tl"]
    class_names = list(meta["class_names"])
    dm, new_root = dataset_for(meta, cfg, cfg.checkpoint)
    check_classes(class_names, dm.class_names, f"dataset {getattr(dm, 'root', dm.name)}")
    dm.set_preprocessing(meta["preprocessing"])
    split = pick_split(dm, str(cfg.get("split", "auto")), new_root)
    loader = dm.make_loader(dm.dataset(split, train_aug=False), shuffle=False)
    want = str(cfg.get("device", "auto"))
    device = torch.device(
        "cuda" if want in ("auto", "cuda", "gpu") and torch.cuda.is_available() else "cpu"
    )
    logits, y = predict_logits(module, loader, device, f"evaluating {split}")
    metrics = score(logits, y, class_names)
    result = {
        "schema_version": EVAL_SCHEMA_VERSION,
        "checkpoint": str(Path(str(cfg.checkpoint)).resolve()),
        "dataset": str(getattr(dm, "root", dm.name)),
        "split": split,
        "class_names": class_names,
        **metrics,
    }
    result["gates"] = [g.as_dict() for g in tl_gates.evaluate(gates, result, "eval")]
    out = Path(str(cfg.output_dir))
    claim_run_dir(out, overwrite=bool(cfg.get("overwrite", False)))  # no earlier outputs; locked
    write_json(out / "eval.json", result)  # strict JSON (NaN -> null, "nonfinite": [keys])
    eval_report(
        out, result, normalize=bool(cfg.get("confusion_normalize", True))
    )  # confusion_matrix.png, report.md
    ds = loader.dataset
    if getattr(ds, "items", None) is not None and len(ds.items) == len(y):
        # misclassified.csv, top_losses.png and the most-confused pairs (fastai's interpretation)
        from tl_cli.run.interpret import interpret

        err = interpret(
            out,
            logits,
            y,
            [item for item, _ in ds.items],
            getattr(ds, "loader", None),
            class_names,
            metrics["confusion_matrix"],
        )
        pairs = ", ".join(
            f"{c['true']} -> {c['predicted']} ({c['count']})" for c in err["most_confused"]
        )
        say(f"most confused (true -> predicted): {pairs or 'none'}")
        say(
            f"{err['misclassified']} misclassified: {err['misclassified_csv']}"
            + (f"; highest losses: {err['top_losses_png']}" if err["top_losses_png"] else "")
        )
    release_run_dir(out)
    t = Table(title=f"per class ({split}, {metrics['num_samples']} images)", header_style="bold")
    for col in ("class", "precision", "recall", "f1", "support"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for c, r in metrics["per_class"].items():
        t.add_row(c, fmt(r["precision"]), fmt(r["recall"]), fmt(r["f1"]), str(r["support"]))
    show(t)
    summary_table(
        f"tl eval: {out / 'eval.json'}",
        result,
        list(EVAL_SUMMARY),
    )
    tl_gates.print_gates(gates)
    tl_gates.enforce(
        gates, str(out / "eval.json")
    )  # exit 1 on a failed gate, after the outputs exist
    return result

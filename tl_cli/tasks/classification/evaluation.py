"""Classification evaluation: scores (torchmetrics), the confusion matrix and the error analysis
of `tl eval` (as fastai's ClassificationInterpretation).

* ``misclassified.csv``: every wrong prediction, highest loss first: the input (a file path, or
  the row index of an array dataset), the true label, the predicted label, the predicted label's
  probability and the true label's probability;
* the most-confused (true, predicted) pairs, printed;
* ``top_losses.png``: the N inputs with the highest loss, each titled predicted / true /
  probability of the prediction (images only);
* ``confusion_matrix.png``: rows = true class, columns = predicted.

Files are written through `tl_cli.core.outputs` (atomically, with the mode of every other output).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from tl_cli.core.outputs import write_bytes
from tl_cli.core.plots import figure, save_figure


def _item_name(item: Any) -> str:
    return str(item)


def losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y, reduction="none")


def misclassified_rows(
    logits: torch.Tensor, y: torch.Tensor, items: list[Any], class_names: list[str]
) -> list[dict[str, Any]]:
    """The wrong predictions, highest loss first."""
    prob = logits.float().softmax(-1)
    pred = prob.argmax(-1)
    loss = losses(logits, y)
    wrong = (pred != y).nonzero().flatten().tolist()
    wrong.sort(key=lambda i: -float(loss[i]))
    return [
        {
            "input": _item_name(items[i]),
            "true": class_names[int(y[i])],
            "predicted": class_names[int(pred[i])],
            "predicted_prob": round(float(prob[i, pred[i]]), 6),
            "true_prob": round(float(prob[i, y[i]]), 6),
            "loss": round(float(loss[i]), 6),
        }
        for i in wrong
    ]


def write_misclassified(path: Path, rows: list[dict[str, Any]]) -> Path:
    buf = io.StringIO()
    cols = ["input", "true", "predicted", "predicted_prob", "true_prob", "loss"]
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_bytes(path, buf.getvalue().encode())
    return path


def most_confused(
    confusion: list[list[int]], class_names: list[str], k: int = 5
) -> list[tuple[str, str, int]]:
    """(true, predicted, count) of the largest off-diagonal cells, largest first."""
    pairs = [
        (class_names[t], class_names[p], int(n))
        for t, row in enumerate(confusion)
        for p, n in enumerate(row)
        if t != p and n > 0
    ]
    pairs.sort(key=lambda r: (-r[2], r[0], r[1]))
    return pairs[:k]


def plot_top_losses(
    path: Path,
    logits: torch.Tensor,
    y: torch.Tensor,
    items: list[Any],
    loader: Any,
    class_names: list[str],
    n: int = 9,
) -> Path | None:
    """A grid of the ``n`` highest-loss inputs, titled predicted / true / probability."""
    from PIL import Image

    loss = losses(logits, y)
    order = loss.argsort(descending=True).tolist()[:n]
    images = []
    for i in order:
        try:
            img = loader(items[i])
        except Exception:  # noqa: BLE001 - an unreadable input: leave it out of the gallery
            continue
        if not isinstance(img, Image.Image):
            return None  # not an image modality
        images.append((i, img))
    if not images:
        return None
    prob = logits.float().softmax(-1)
    cols = min(3, len(images))
    rows = (len(images) + cols - 1) // cols
    fig = figure(3.2 * cols, 3.4 * rows)
    fig.suptitle("top losses: predicted / true / probability of the prediction")
    for k, (i, img) in enumerate(images):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(img)
        p = int(prob[i].argmax())
        ax.set_title(
            f"{class_names[p]} / {class_names[int(y[i])]} / {float(prob[i, p]):.2f}\n"
            f"loss {float(loss[i]):.2f}",
            fontsize=9,
        )
        ax.axis("off")
    save_figure(fig, path)
    return path


def interpret(
    out: Path,
    logits: torch.Tensor,
    y: torch.Tensor,
    items: list[Any],
    loader: Any,
    class_names: list[str],
    confusion: list[list[int]],
) -> dict[str, Any]:
    """Write misclassified.csv and top_losses.png; return what to print and record."""
    rows = misclassified_rows(logits, y, items, class_names)
    csv_path = write_misclassified(out / "misclassified.csv", rows)
    png = plot_top_losses(out / "top_losses.png", logits, y, items, loader, class_names)
    return {
        "misclassified": len(rows),
        "misclassified_csv": str(csv_path),
        "top_losses_png": str(png) if png else None,
        "most_confused": [
            {"true": t, "predicted": p, "count": n}
            for t, p, n in most_confused(confusion, class_names)
        ],
    }


def normalize_rows(matrix: list[list[int]]):
    """Each row divided by its total (a row with no inputs stays 0): per-class recall on the diagonal."""
    import numpy as np

    cm = np.asarray(matrix, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)


def plot_confusion(
    matrix: list[list[int]],
    class_names: list[str],
    path: Path,
    normalize: bool = True,
    title: str = "",
    noun: str = "inputs",
) -> Path:
    """Rows = true class, columns = predicted; ``normalize`` divides each row by its count (recall)."""
    save_figure(confusion_figure(matrix, class_names, normalize, title, noun), path)
    return path


def confusion_figure(
    matrix: list[list[int]],
    class_names: list[str],
    normalize: bool = True,
    title: str = "",
    noun: str = "inputs",
):
    import numpy as np

    cm = np.asarray(matrix, dtype=float)
    n = len(class_names)
    shown = normalize_rows(matrix) if normalize else cm
    side = min(max(5.0, 0.45 * n + 2.5), 30.0)
    fig = figure(side + 1.0, side)
    ax = fig.subplots()
    im = ax.imshow(
        shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else max(1.0, float(cm.max()))
    )
    fig.colorbar(
        im,
        ax=ax,
        fraction=0.046,
        pad=0.04,
        label="fraction of true class" if normalize else noun,
    )
    font = 10 if n <= 12 else 8 if n <= 25 else 6 if n <= 50 else 4
    ax.set_xticks(
        range(n),
        labels=class_names,
        rotation=45 if n > 4 else 0,
        ha="right" if n > 4 else "center",
        fontsize=font,
    )
    ax.set_yticks(range(n), labels=class_names, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 25:
        hi = shown.max() if shown.size else 0.0
        for i in range(n):
            for j in range(n):
                text = f"{shown[i, j]:.2f}\n({int(cm[i, j])})" if normalize else str(int(cm[i, j]))
                dark = shown[i, j] > 0.6 * (1.0 if normalize else hi)
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=font - 1,
                    color="white" if dark else "black",
                )
    ax.set_title(
        title or ("Confusion matrix (row-normalised)" if normalize else "Confusion matrix")
    )
    return fig


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

"""Error analysis for `tl eval` (as fastai's ClassificationInterpretation).

* ``misclassified.csv``: every wrong prediction, highest loss first: the input (a file path, or
  the row index of an array dataset), the true label, the predicted label, the predicted label's
  probability and the true label's probability;
* the most-confused (true, predicted) pairs, printed;
* ``top_losses.png``: the N inputs with the highest loss, each titled predicted / true /
  probability of the prediction (images only).

Files are written atomically (a temp file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


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
    _atomic_write(path, buf.getvalue().encode())
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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    prob = logits.float().softmax(-1)
    cols = min(3, len(images))
    rows = (len(images) + cols - 1) // cols
    fig = Figure(figsize=(3.2 * cols, 3.4 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _atomic_write(path, buf.getvalue())
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

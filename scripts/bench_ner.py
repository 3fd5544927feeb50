#!/usr/bin/env python
"""NER: tl's token-classification pieces next to the Hugging Face recipe, on WNUT 2017.

    flock /work/heavy.lock python scripts/bench_ner.py cli --command finetune [--set KEY=VALUE]
    flock /work/heavy.lock python scripts/bench_ner.py cli --command train
    flock /work/heavy.lock python scripts/bench_ner.py reference --epochs 3
    flock /work/heavy.lock python scripts/bench_ner.py tl --epochs 3 [--lr 5e-5 --head-lr 1e-3 ...]

``cli`` runs the real ``tl finetune task=ner`` / ``tl train task=ner`` (frozen encoder) with
their defaults in a subprocess (``--limit N``: the first N training sentences, written out as
CoNLL files) and reads metrics.json.

``reference`` is the Hugging Face token-classification recipe (``run_ner.py``) written as a
plain PyTorch loop on the same encoder (the bundled all-MiniLM-L6-v2, loaded by
``AutoModelForTokenClassification`` from its package directory): the fast tokenizer with
``is_split_into_words``, labels on each word's first sub-token (-100 elsewhere),
``DataCollatorForTokenClassification``, AdamW (lr 5e-5, no weight decay), batch 16, a linear
decay without warm-up, the data's own tag list, random batches; test F1 by seqeval after the last
epoch. ``tl`` runs the same kind of loop built from ``tl_cli.tasks.ner`` (windows, first
sub-token labels, ``TextBackbone.token_features`` + ``TokenHead``) with the options to compare
(learning rates of head and encoder, warm-up, epochs, length-grouped batches, window length).

Each run appends one JSON line (F1 on val and test, fit seconds, seconds per epoch, the load
average) to build/bench/ner/results.jsonl as soon as it finishes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = (ROOT.parent / "shared" / "data" / "ner-wnut17").resolve()
OUT = ROOT / "build" / "bench" / "ner" / "results.jsonl"


def load_avg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def record(row: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    row = {**row, "load": load_avg(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(out, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def data(root: Path, limit: int | None, eval_limit: int | None, val_limit: int | None) -> Any:
    from tl_cli.tasks.ner.io import load

    d = load(root)
    if limit:
        d.splits["train"] = d.splits["train"][:limit]
    if eval_limit:
        for k in ("val", "test"):
            d.splits[k] = d.splits[k][:eval_limit]
    if val_limit:
        d.splits["val"] = d.splits["val"][:val_limit]
    return d


def linear_schedule(
    opt: torch.optim.Optimizer, total: int, warmup: int, shape: str = "linear"
) -> Any:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 or cosine to 1% (tl's)."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        if shape == "cosine":
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))
        return max(0.0, 1.0 - t)

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def budget_epochs(per_epoch: int, args: argparse.Namespace) -> int:
    """epochs = clamp(ceil(min_steps / steps per epoch), min_epochs, max_epochs)."""
    return int(min(args.max_epochs, max(args.min_epochs, math.ceil(args.min_steps / per_epoch))))


# --------------------------------------------------------------------------- reference


def reference(args: argparse.Namespace, d: Any) -> dict[str, Any]:
    """The Hugging Face recipe as a plain loop (see the module docstring)."""
    from seqeval.metrics import f1_score
    from transformers import (
        AutoModelForTokenClassification,
        AutoTokenizer,
        DataCollatorForTokenClassification,
    )

    from tl_cli.modalities.text.tokenizer import MINILM_PACKAGE, package_dir

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    src = str(package_dir(MINILM_PACKAGE))
    labels = d.labels  # BIO, as in the files
    lid = {t: i for i, t in enumerate(labels)}
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    model = AutoModelForTokenClassification.from_pretrained(
        src, num_labels=len(labels), local_files_only=True
    )

    def features(sents: list[Any]) -> list[dict[str, Any]]:
        enc = tok([s.tokens for s in sents], truncation=True, is_split_into_words=True)
        rows = []
        for i, s in enumerate(sents):
            prev, lab = None, []
            for w in enc.word_ids(i):
                lab.append(-100 if w is None or w == prev else lid[s.tags[w]])
                prev = w
            rows.append({"input_ids": enc["input_ids"][i], "labels": lab})
        return rows

    train = features(d.splits["train"])
    collate = DataCollatorForTokenClassification(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    per_epoch = math.ceil(len(train) / args.batch_size)
    epochs = args.epochs or budget_epochs(per_epoch, args)
    steps = per_epoch * epochs
    sched = linear_schedule(opt, steps, 0)
    t0, c0 = time.perf_counter(), time.process_time()
    epoch_s = []
    for _ in range(epochs):
        e0 = time.perf_counter()
        model.train()
        order = list(range(len(train)))
        random.shuffle(order)
        for b in range(0, len(order), args.batch_size):
            batch = collate([train[i] for i in order[b : b + args.batch_size]])
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        epoch_s.append(time.perf_counter() - e0)
    fit, fit_cpu = time.perf_counter() - t0, time.process_time() - c0

    def evaluate(split: str) -> float:
        model.eval()
        sents = d.splits[split]
        rows = features(sents)
        gold, pred = [], []
        with torch.no_grad():
            for b in range(0, len(rows), 64):
                part = rows[b : b + 64]
                batch = collate(part)
                y = batch.pop("labels")
                logits = model(**batch).logits
                for r in range(len(part)):
                    keep = y[r] != -100
                    gold.append([labels[k] for k in y[r][keep].tolist()])
                    pred.append([labels[k] for k in logits[r][keep].argmax(-1).tolist()])
        return float(f1_score(gold, pred))

    e0 = time.perf_counter()
    out = {"val_f1": evaluate("val"), "test_f1": evaluate("test"), "epochs_run": epochs}
    return {
        **out,
        "fit_s": round(fit, 1),
        "fit_cpu_s": round(fit_cpu, 1),
        "epoch_s": [round(x, 1) for x in epoch_s],
        "eval_s": round(time.perf_counter() - e0, 1),
    }


# --------------------------------------------------------------------------- tl pieces


def tl_loop(args: argparse.Namespace, d: Any) -> dict[str, Any]:
    """A loop built from tl_cli.tasks.ner with the options under test."""
    from tl_cli.modalities.text.backbone import build_minilm
    from tl_cli.tasks.ner import align, metrics, model
    from tl_cli.tasks.ner.data import LengthGrouped

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    backbone = build_minilm()
    max_length = args.max_length or backbone.preprocessing["max_length"]
    al = align.Aligner(backbone.tokenizer, max_length, args.stride)
    lid = {t: i for i, t in enumerate(d.labels)}
    head = model.TokenHead(backbone.num_features, len(d.labels), dropout=args.dropout)
    tagger = model.TokenTagger(backbone, head)
    collate = align.TokenCollate(backbone.preprocessing["pad_id"])

    def dataset(split: str, train: bool) -> align.TokenDataset:
        sents = d.splits[split]
        wins, _ = al.windows([s.tokens for s in sents])
        tags = [[lid.get(t, 0) for t in s.tags] for s in sents]
        return align.TokenDataset(wins, tags, align.word_offsets([s.tokens for s in sents]), train)

    def evaluate(split: str) -> float:
        tagger.eval()
        ds = dataset(split, False)
        idx, rows = [], []
        with torch.no_grad():
            for b in range(0, len(ds), 64):
                x, y = collate([ds[i] for i in range(b, min(len(ds), b + 64))])
                k, v = align.gather_words(tagger(x), y["word_index"])
                idx.append(k)
                rows.append(v)
        sents = d.splits[split]
        total = sum(len(s.tokens) for s in sents)
        words = align.merge(idx, rows, total).argmax(-1).tolist()
        pred = align.split_by_sentence([d.labels[k] for k in words], [len(s.tokens) for s in sents])
        return metrics.score([s.tags for s in sents], pred)["f1"]

    train = dataset("train", True)
    groups = [
        {"params": list(head.parameters()), "lr": args.head_lr or args.lr, "weight_decay": 0.0}
    ]
    if args.frozen:
        backbone.requires_grad_(False)
    else:
        groups.append(
            {"params": list(backbone.parameters()), "lr": args.lr, "weight_decay": args.wd}
        )
    opt = torch.optim.AdamW(groups)
    per_epoch = math.ceil(len(train) / args.batch_size)
    epochs = args.epochs or budget_epochs(per_epoch, args)
    steps = per_epoch * epochs
    sched = linear_schedule(opt, steps, int(args.warmup * steps), args.schedule)
    sampler = LengthGrouped(train.lengths(), args.batch_size, seed=args.seed)

    def batches(epoch: int) -> list[list[int]]:
        if args.group_by_length:
            sampler.set_epoch(epoch)
            order = list(sampler)
        else:
            order = list(range(len(train)))
            rng.shuffle(order)
        return [order[b : b + args.batch_size] for b in range(0, len(order), args.batch_size)]

    t0, c0 = time.perf_counter(), time.process_time()
    epoch_s, val_curve = [], []
    best: tuple[float, dict[str, torch.Tensor] | None] = (-1.0, None)
    for epoch in range(epochs):
        e0 = time.perf_counter()
        tagger.train()
        if args.frozen:
            backbone.eval()  # a frozen encoder extracts features: no dropout (as tl)
        for b in batches(epoch):
            x, y = collate([train[i] for i in b])
            loss = model.token_loss(tagger(x), y["labels"])
            loss.backward()
            if args.clip:
                torch.nn.utils.clip_grad_norm_(tagger.parameters(), args.clip)
            opt.step()
            sched.step()
            opt.zero_grad()
        if args.select_best:  # tl validates every epoch and tests the best (val/f1) checkpoint
            f1 = evaluate("val")
            val_curve.append(round(f1, 4))
            if f1 > best[0]:
                best = (f1, {k: v.detach().clone() for k, v in tagger.state_dict().items()})
        epoch_s.append(time.perf_counter() - e0)
    if best[1] is not None:
        tagger.load_state_dict(best[1])
    fit, fit_cpu = time.perf_counter() - t0, time.process_time() - c0
    e0 = time.perf_counter()
    out = {"val_f1": evaluate("val"), "test_f1": evaluate("test"), "epochs_run": epochs}
    return {
        **out,
        "val_curve": val_curve,
        "fit_s": round(fit, 1),
        "fit_cpu_s": round(fit_cpu, 1),
        "epoch_s": [round(x, 1) for x in epoch_s],
        "eval_s": round(time.perf_counter() - e0, 1),
    }


def materialize(args: argparse.Namespace, d: Any) -> Path:
    """The (limited) splits as CoNLL files for the tl commands: build/bench/ner/data_<limits>/."""
    name = f"data_{args.limit or 'all'}_{args.val_limit or 'all'}_{args.eval_limit or 'all'}"
    root = OUT.parent / name
    root.mkdir(parents=True, exist_ok=True)
    for split, fname in (("train", "train.conll"), ("val", "dev.conll"), ("test", "test.conll")):
        text = "\n".join(
            "".join(f"{w}\t{t}\n" for w, t in zip(s.tokens, s.tags, strict=True))
            for s in d.splits[split]
        )
        (root / fname).write_text(text, encoding="utf-8")
    return root


def cli(args: argparse.Namespace, d: Any) -> dict[str, Any]:
    """``tl finetune|train task=ner`` in a subprocess, defaults plus ``--set`` overrides."""
    import resource
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _bench_util import run_tl

    root = materialize(args, d) if (args.limit or args.val_limit or args.eval_limit) else args.root
    tag = args.tag or f"{args.command}_{args.limit or 'all'}"
    overrides = ["task=ner", f"dataset.root={root}", f"seed={args.seed}", *args.set]
    if args.epochs:
        overrides.append(f"trainer.max_epochs={args.epochs}")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = run_tl(args.command, overrides, OUT.parent / "runs" / tag)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    m = res["metrics"]
    return {
        "cmd": res["cmd"],
        "val_f1": m.get("val/f1"),
        "test_f1": m.get("test/f1"),
        "epochs_run": m.get("epochs"),
        "best_epoch": m.get("best_epoch"),
        "val_curve": [round(r.get("val/f1", 0.0), 4) for r in m.get("history", [])],
        "fit_s": m.get("fit_seconds"),
        "wall_s": res["wall_seconds"],
        "cpu_s": round(cpu, 1),
        "defaults": m.get("defaults"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["reference", "tl", "cli"])
    ap.add_argument("--command", default="finetune", help="cli mode: finetune or train")
    ap.add_argument("--set", action="append", default=[], help="cli mode: a tl override")
    ap.add_argument("--root", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--epochs", type=int, default=3, help="0: the budget rule below")
    ap.add_argument("--min-steps", type=int, default=600)
    ap.add_argument("--min-epochs", type=int, default=3)
    ap.add_argument("--max-epochs", type=int, default=30)
    ap.add_argument("--schedule", choices=["linear", "cosine"], default="linear")
    ap.add_argument("--frozen", action="store_true", help="train the head only (tl train)")
    ap.add_argument("--select-best", action="store_true", help="validate each epoch, keep best")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--head-lr", type=float, default=None)
    ap.add_argument("--wd", type=float, default=0.0)
    ap.add_argument("--warmup", type=float, default=0.0, help="share of the steps")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=0.0)
    ap.add_argument("--group-by-length", action="store_true")
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--stride", type=int, default=32)
    ap.add_argument("--limit", type=int, default=None, help="first N training sentences")
    ap.add_argument("--eval-limit", type=int, default=None, help="first N val/test sentences")
    ap.add_argument("--val-limit", type=int, default=None, help="first N val sentences")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="a label for this run in the results file")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    d = data(args.root, args.limit, args.eval_limit, args.val_limit)
    start = load_avg()
    res = {"reference": reference, "tl": tl_loop, "cli": cli}[args.mode](args, d)
    opts = {k: v for k, v in vars(args).items() if k not in ("root", "out", "mode")}
    if args.mode == "cli":  # the loop options do not apply
        opts = {
            k: opts[k]
            for k in ("command", "set", "epochs", "limit", "val_limit", "eval_limit", "seed", "tag")
        }
    record(
        {
            "mode": args.mode,
            **opts,
            **res,
            "load_start": start,
            "threads": torch.get_num_threads(),
            "train_sentences": len(d.splits["train"]),
        },
        args.out,
    )


if __name__ == "__main__":
    main()

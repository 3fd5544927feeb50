#!/usr/bin/env python
"""Distillation: a small student trained alone vs distilled vs distilled + unlabelled inputs.

    python scripts/bench_distill.py [--seeds 0 1 2] [--size 64] [--per-class 100] [--epochs 10]
                                    [--skip-image] [--skip-text] [--write-doc]

Runs the real ``tl`` executable (``tl finetune`` for teachers and students trained alone,
``tl distill`` for the rest), each in a subprocess, and reads their metrics.json.

* Images: the shared CIFAR subset at ``--size`` px; a labelled slice of ``--per-class`` images
  per class (the first files by name; 10% carved as val), the rest of train as a flat folder of
  unlabelled inputs (``dataset.unlabeled_root``), the whole test split for scoring. Teacher: a
  fine-tuned ``efficientnet_lite2`` (bundled weights). Students: ``efficientnet_lite0`` cut to its
  first 8 of 16 blocks (``backbone.depth=8``, ImageNet weights), and timm's
  ``mobilenetv3_small_050`` from random init (timm has no weights offline).
* Text: the shared Amazon sentences (a fixed shuffle: 200 labelled, 400 test, 400 unlabelled).
  Teacher: fine-tuned MiniLM-L6; student: its first 2 layers (``backbone.depth=2``), trained alone
  from MiniLM's pretrained first 2 layers, or distilled from the fine-tuned teacher's first 2.
* Same budget per row: the same optimizer steps (``--epochs`` over the labelled set; a row with
  unlabelled inputs runs proportionally fewer epochs over its larger train split) and the same
  settings. Each teacher is trained once (seed 0); every student row runs with each seed.

Prints markdown tables; ``--write-doc`` appends them under ``## Distillation`` at the end of
docs/benchmarks.md (replacing an earlier copy of that section).
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import time
from pathlib import Path
from typing import Any

from _bench_util import DEFAULT_DATA, ROOT, command_line, machine, md_table, run_tl, save_json

OUT = ROOT / "build" / "bench" / "distill"
TEXT_CSV = (ROOT.parent / "shared" / "data" / "sentiment-amazon" / "amazon_cells.csv").resolve()
CPU = ["trainer.accelerator=cpu", "trainer.devices=1", "overwrite=true"]


def image_data(src: Path, per_class: int) -> tuple[Path, Path, int, int]:
    """(labelled root with train/ + test/, flat unlabelled folder, labelled count, unlabelled count)."""
    lab, unl = OUT / "data" / f"cifar_{per_class}", OUT / "data" / f"cifar_unlabeled_{per_class}"
    n_lab = n_unl = 0
    for cls in sorted(p for p in (src / "train").iterdir() if p.is_dir()):
        files = sorted(cls.glob("*.png"))
        (lab / "train" / cls.name).mkdir(parents=True, exist_ok=True)
        unl.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(files):
            dst = (
                lab / "train" / cls.name / f.name if i < per_class else unl / f"{cls.name}_{f.name}"
            )
            if not dst.exists():
                dst.symlink_to(f)
            n_lab, n_unl = (n_lab + 1, n_unl) if i < per_class else (n_lab, n_unl + 1)
    if not (lab / "test").exists():
        (lab / "test").symlink_to(src / "test", target_is_directory=True)
    return lab, unl, n_lab, n_unl


def text_data() -> tuple[Path, Path, int, int]:
    rows = list(csv.DictReader(TEXT_CSV.open()))
    random.Random(0).shuffle(rows)
    d = OUT / "data" / "amazon"
    d.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.csv", rows[:200]), ("test.csv", rows[200:600])):
        with (d / name).open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["text", "label"])
            w.writeheader()
            w.writerows(part)
    unl = OUT / "data" / "amazon_unlabeled.txt"
    unl.write_text("\n".join(r["text"].replace("\n", " ") for r in rows[600:]) + "\n")
    return d, unl, 200, len(rows) - 600


def steps_epochs(epochs: int, n_lab: int, n_unl: int) -> int:
    """Epochs over labelled + unlabelled inputs that make about as many steps as ``epochs`` over labelled."""
    train_lab = n_lab * 0.9  # 10% of the labelled slice is carved as val
    return max(1, round(epochs * train_lab / (train_lab + n_unl)))


def mean_sd(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def group(
    name: str,
    teacher_cmd: tuple[str, list[str]],
    students: list[tuple[str, list[str], list[str]]],
    unl: Path,
    n_lab: int,
    n_unl: int,
    seeds: list[int],
    epochs: int,
) -> dict[str, Any]:
    """Teacher once, then per student: alone / distilled / distilled + unlabelled, per seed."""
    out = OUT / name
    command, ov = teacher_cmd
    print(f"[{name}] teacher: tl {command} ...", flush=True)
    t = run_tl(command, [*ov, f"trainer.max_epochs={epochs}", "seed=0", *CPU], out / "teacher")
    teacher_ckpt = out / "teacher" / "checkpoints" / "best.ckpt"
    print(f"[{name}] teacher test/acc {t['metrics']['test/acc']:.3f}", flush=True)
    e_unl = steps_epochs(epochs, n_lab, n_unl)
    results: dict[str, Any] = {"teacher": t, "rows": []}
    for label, alone, distill in students:
        variants = [
            ("alone", "finetune", alone, epochs),
            ("distilled", "distill", [f"teacher={teacher_ckpt}", *distill], epochs),
            (
                "distilled + unlabelled",
                "distill",
                [f"teacher={teacher_ckpt}", *distill, f"dataset.unlabeled_root={unl}"],
                e_unl,
            ),
        ]
        for variant, cmd, args, ep in variants:
            runs = []
            for s in seeds:
                run_dir = out / f"{label}-{variant.replace(' + ', '-')}-s{s}"
                print(f"[{name}] {label} {variant} seed {s} ...", flush=True)
                r = run_tl(cmd, [*args, f"trainer.max_epochs={ep}", f"seed={s}", *CPU], run_dir)
                m = r["metrics"]
                print(
                    f"    test/acc {m['test/acc']:.3f}  steps {m['defaults']['optimizer_steps']}  "
                    f"fit {m['fit_seconds']:.0f}s  wall {r['wall_seconds']:.0f}s",
                    flush=True,
                )
                runs.append(r)
            results["rows"].append({"student": label, "variant": variant, "runs": runs})
    return results


def table(name: str, res: dict[str, Any]) -> str:
    t = res["teacher"]["metrics"]
    alone: dict[str, float] = {}
    speed: dict[str, dict[str, Any]] = {}
    for row in res["rows"]:
        m0 = row["runs"][0]["metrics"]
        if "speedup_b1" in m0:
            speed.setdefault(row["student"], m0)
    rows = []
    for row in res["rows"]:
        accs = [r["metrics"]["test/acc"] for r in row["runs"]]
        mean = statistics.mean(accs)
        if row["variant"] == "alone":
            alone[row["student"]] = mean
        sp = speed.get(row["student"], {})
        rows.append(
            [
                row["student"],
                row["variant"],
                mean_sd(accs),
                f"{100 * (mean - alone[row['student']]):+.1f}" if row["variant"] != "alone" else "",
                f"{100 * mean / t['test/acc']:.0f}%",
                f"{sp.get('speedup_b1', float('nan')):.1f}x / {sp.get('speedup_b32', float('nan')):.1f}x",
                f"{sp.get('student_params', 0) / 1e6:.2f}M",
                str(row["runs"][0]["metrics"]["defaults"]["optimizer_steps"]),
                f"{statistics.mean(r['metrics']['fit_seconds'] for r in row['runs']):.0f}",
            ]
        )
    head = (
        f"Teacher {t['backbone']}: test acc {t['test/acc']:.3f}, "
        f"{next(iter(speed.values()), {}).get('teacher_params', 0) / 1e6:.2f}M params, CPU "
        f"{next(iter(speed.values()), {}).get('teacher_latency_ms_b1', float('nan')):.1f} ms/input "
        f"at batch 1, {next(iter(speed.values()), {}).get('teacher_latency_ms_b32', float('nan')):.2f} at batch 32."
    )
    return (
        head
        + "\n\n"
        + md_table(
            [
                "student",
                "trained",
                "test acc (mean ± sd)",
                "vs alone (points)",
                "of teacher",
                "CPU speed-up b1 / b32",
                "params",
                "steps",
                "fit s",
            ],
            rows,
            "llrrrrrrr",
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--text-epochs", type=int, default=8)
    ap.add_argument("--skip-image", action="store_true")
    ap.add_argument("--skip-text", action="store_true")
    ap.add_argument("--write-doc", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    out: dict[str, Any] = {"machine": machine(), "command": command_line(), "args": vars(args)}
    sections = []
    if not args.skip_image:
        lab, unl, n_lab, n_unl = image_data(args.data, args.per_class)
        img = [f"dataset=imagefolder", f"dataset.root={lab}", f"dataset.image_size={args.size}"]
        timm_student = [
            "backbone=timm",
            "backbone.name=mobilenetv3_small_050",
            "backbone.weights=none",
            # random init: the backbone learns at the full LR, with batch statistics, from a random head
            "strategy.backbone_lr_mult=1.0",
            "strategy.bn=train",
            "strategy.head_fit=sgd",
        ]
        res = group(
            "image",
            ("finetune", [*img, "backbone=efficientnet_lite2"]),
            [
                ("lite0 depth 8", [*img, "backbone.depth=8"], [*img, "backbone=efficientnet_lite0", "backbone.depth=8"]),
                ("mobilenetv3_small_050 (random init)", [*img, *timm_student], [*img, *timm_student]),
            ],
            unl,
            n_lab,
            n_unl,
            args.seeds,
            args.epochs,
        )
        out["image"] = res
        sections.append(
            f"### Images: CIFAR subset at {args.size} px, {args.per_class} labelled per class, "
            f"{n_unl} unlabelled\n\n" + table("image", res)
        )
    if not args.skip_text:
        d, unl, n_lab, n_unl = text_data()
        txt = ["task=text", f"dataset.root={d}"]
        res = group(
            "text",
            ("finetune", txt),
            [("MiniLM depth 2", [*txt, "backbone.depth=2"], [*txt, "backbone.depth=2"])],
            unl,
            n_lab,
            n_unl,
            args.seeds,
            args.text_epochs,
        )
        out["text"] = res
        sections.append(
            f"### Text: Amazon sentences, {n_lab} labelled, 400 test, {n_unl} unlabelled\n\n"
            + table("text", res)
        )
    out["seconds"] = round(time.time() - t0)
    save_json(OUT / "results.json", out)
    body = "\n\n".join(sections)
    print()
    print(body)
    print(f"\n{out['seconds']} s")
    if args.write_doc:
        doc = ROOT / "docs" / "benchmarks.md"
        text = doc.read_text()
        text = text.split("\n## Distillation\n", 1)[0].rstrip() + "\n"
        text += (
            f"\n## Distillation\n\n`{out['command']}` ({out['seconds'] // 60} min). {out['machine']}\n\n"
            + body
            + "\n"
        )
        doc.write_text(text)


if __name__ == "__main__":
    main()

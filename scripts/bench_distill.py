#!/usr/bin/env python
"""Distillation: a small student trained alone vs distilled vs distilled + unlabelled inputs.

    python scripts/bench_distill.py [--seeds 0 1 2] [--size 64] [--per-class 50] [--unlabeled 100]
                                    [--test-per-class 40] [--skip-image] [--skip-text] [--write-doc]

Runs the real ``tl`` executable (``tl train`` / ``tl finetune`` for teachers and students trained
alone, ``tl distill`` for the rest), each in a subprocess, and reads their metrics.json. Sized for
a shared 2-core CPU machine (the development machine ran fine-tuning at ~0.7 s per 64 px image
under its usual load), so:

* Images: the shared CIFAR subset at ``--size`` px: ``--per-class`` labelled training images per
  class (the first files by name; 10% carved as val), the next ``--unlabeled`` per class as a flat
  folder of unlabelled inputs (``dataset.unlabeled_root``), the first ``--test-per-class`` test
  images per class. Teacher: ``efficientnet_lite2`` (bundled ImageNet weights), frozen features +
  an L-BFGS-fitted head (``tl train``; fine-tuning it did not fit the time budget). Student:
  ``efficientnet_lite0`` cut to its first 8 of 16 blocks (``backbone.depth=8``, ImageNet
  weights), frozen, its head trained: alone (``tl train``: L-BFGS head on true labels) or by
  distillation (``tl distill strategy=feature_extraction``: the L-BFGS head, then 10 epochs of the
  KD loss; the student's features and the teacher's logits are cached together, once).
* Text: the shared Amazon sentences (a fixed shuffle: 200 labelled, 400 test, 400 unlabelled).
  Teacher: fine-tuned MiniLM-L6 (``tl finetune task=text``); student: its first 2 layers
  (``backbone.depth=2``) fine-tuned, alone from MiniLM's pretrained first 2 layers or distilled
  from the fine-tuned teacher's first 2 (DistilBERT-style); the teacher's logits are cached once.
* Same budget per row: the same settings and (text) the same optimizer steps: a row with
  unlabelled inputs runs proportionally fewer epochs over its larger train split. Each teacher is
  trained once (seed 0); every student row runs with each seed.

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
REUSE_TEACHERS = False


def image_data(src: Path, per_class: int, unlabeled: int, test_per_class: int):
    """(labelled root with train/ + test/, flat unlabelled folder, labelled count, unlabelled count)."""
    tag = f"{per_class}_{unlabeled}_{test_per_class}"
    lab, unl = OUT / "data" / f"cifar_{tag}", OUT / "data" / f"cifar_unlabeled_{tag}"
    n_lab = n_unl = 0
    for cls in sorted(p for p in (src / "train").iterdir() if p.is_dir()):
        files = sorted(cls.glob("*.png"))[: per_class + unlabeled]
        (lab / "train" / cls.name).mkdir(parents=True, exist_ok=True)
        (lab / "test" / cls.name).mkdir(parents=True, exist_ok=True)
        unl.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(files):
            dst = (
                lab / "train" / cls.name / f.name if i < per_class else unl / f"{cls.name}_{f.name}"
            )
            if not dst.exists():
                dst.symlink_to(f)
            n_lab, n_unl = (n_lab + 1, n_unl) if i < per_class else (n_lab, n_unl + 1)
        for f in sorted((src / "test" / cls.name).glob("*.png"))[:test_per_class]:
            if not (lab / "test" / cls.name / f.name).exists():
                (lab / "test" / cls.name / f.name).symlink_to(f)
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
    students: list[tuple[str, list[tuple[str, str, list[str]]]]],
    seeds: list[int],
) -> dict[str, Any]:
    """Teacher once, then each student's variants (name, command, overrides), per seed."""
    out = OUT / name
    command, ov = teacher_cmd
    done = out / "teacher" / "metrics.json"
    if REUSE_TEACHERS and done.is_file():  # --reuse-teachers: an earlier run's teacher
        import json

        print(f"[{name}] teacher: reusing {done.parent}", flush=True)
        t = {"metrics": json.loads(done.read_text()), "reused": True}
    else:
        print(f"[{name}] teacher: tl {command} ...", flush=True)
        t = run_tl(command, [*ov, "seed=0", *CPU], out / "teacher")
    teacher_ckpt = out / "teacher" / "checkpoints" / "best.ckpt"
    print(f"[{name}] teacher test/acc {t['metrics']['test/acc']:.3f}", flush=True)
    results: dict[str, Any] = {"teacher": t, "rows": []}
    for label, variants in students:
        for variant, cmd, args in variants:
            args = [a.replace("TEACHER", str(teacher_ckpt)) for a in args]
            runs = []
            for s in seeds:
                run_dir = out / f"{label}-{variant}-s{s}".replace(" ", "_").replace("+", "")
                print(f"[{name}] {label} {variant} seed {s} ...", flush=True)
                r = run_tl(cmd, [*args, f"seed={s}", *CPU], run_dir)
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
    # latency is measured inside each distill run, on a shared machine: the median over runs
    keys = (
        "speedup_b1",
        "speedup_b32",
        "student_params",
        "teacher_params",
        "teacher_latency_ms_b1",
        "teacher_latency_ms_b32",
    )
    for row in res["rows"]:
        for r in row["runs"]:
            if "speedup_b1" in r["metrics"]:
                sp = speed.setdefault(row["student"], {k: [] for k in keys})
                for k in keys:
                    sp[k].append(r["metrics"][k])
    speed = {s: {k: statistics.median(v) for k, v in d.items()} for s, d in speed.items()}
    in_run = [
        r["metrics"]["teacher/test/acc"]
        for row in res["rows"]
        for r in row["runs"]
        if "teacher/test/acc" in r["metrics"]
    ]
    # the teacher measured inside the distill runs: same split, the student's input pipeline
    t_acc = statistics.median(in_run) if in_run else t["test/acc"]
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
                f"{100 * mean / t_acc:.0f}%",
                f"{sp.get('speedup_b1', float('nan')):.1f}x / {sp.get('speedup_b32', float('nan')):.1f}x",
                f"{sp.get('student_params', 0) / 1e6:.2f}M",
                str(row["runs"][0]["metrics"]["defaults"]["optimizer_steps"]),
                f"{statistics.mean(r['metrics']['fit_seconds'] for r in row['runs']):.0f}",
            ]
        )
    head = (
        f"Teacher {t['backbone']}: test acc {t['test/acc']:.3f} in its own run, {t_acc:.3f} "
        "measured inside the distill runs (the 'of teacher' column), "
        f"{next(iter(speed.values()), {}).get('teacher_params', 0) / 1e6:.2f}M params, CPU "
        f"{next(iter(speed.values()), {}).get('teacher_latency_ms_b1', float('nan')):.1f} ms/input "
        f"at batch 1, {next(iter(speed.values()), {}).get('teacher_latency_ms_b32', float('nan')):.2f} at batch 32 "
        "(medians over the distill runs; the speed-up column too)."
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
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--unlabeled", type=int, default=100)
    ap.add_argument("--test-per-class", type=int, default=40)
    ap.add_argument("--text-epochs", type=int, default=5)
    ap.add_argument("--skip-image", action="store_true")
    ap.add_argument("--skip-text", action="store_true")
    ap.add_argument("--write-doc", action="store_true")
    ap.add_argument(
        "--reuse-teachers", action="store_true", help="keep a teacher an earlier run trained"
    )
    args = ap.parse_args()
    global REUSE_TEACHERS
    REUSE_TEACHERS = args.reuse_teachers
    t0 = time.time()
    out: dict[str, Any] = {
        "machine": machine(),
        "command": command_line(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    sections = []
    if not args.skip_image:
        lab, unl, n_lab, n_unl = image_data(
            args.data, args.per_class, args.unlabeled, args.test_per_class
        )
        img = [
            "dataset=imagefolder",
            f"dataset.root={lab}",
            f"dataset.image_size={args.size}",
            "dataset.num_workers=0",
            f"strategy.cache_dir={OUT / 'cache'}",
        ]
        student = ["backbone=efficientnet_lite0", "backbone.depth=8"]
        kd = ["teacher=TEACHER", "strategy=feature_extraction", *img, *student]
        res = group(
            "image",
            ("train", [*img, "backbone=efficientnet_lite2"]),
            [
                (
                    "lite0 depth 8",
                    [
                        ("alone", "train", [*img, *student]),
                        ("distilled", "distill", kd),
                        (
                            "distilled + unlabelled",
                            "distill",
                            [*kd, f"dataset.unlabeled_root={unl}"],
                        ),
                    ],
                )
            ],
            args.seeds,
        )
        out["image"] = res
        sections.append(
            f"### Images: CIFAR subset at {args.size} px, {n_lab} labelled, {n_unl} unlabelled, "
            f"{10 * args.test_per_class} test\n\n" + table("image", res)
        )
    if not args.skip_text:
        d, unl, n_lab, n_unl = text_data()
        txt = ["task=text", f"dataset.root={d}", "dataset.num_workers=0"]
        e, e_unl = args.text_epochs, steps_epochs(args.text_epochs, n_lab, n_unl)
        kd = ["teacher=TEACHER", *txt, "backbone.depth=2"]
        res = group(
            "text",
            ("finetune", [*txt, f"trainer.max_epochs={e}"]),
            [
                (
                    "MiniLM depth 2",
                    [
                        (
                            "alone",
                            "finetune",
                            [*txt, "backbone.depth=2", f"trainer.max_epochs={e}"],
                        ),
                        ("distilled", "distill", [*kd, f"trainer.max_epochs={e}"]),
                        (
                            "distilled + unlabelled",
                            "distill",
                            [*kd, f"dataset.unlabeled_root={unl}", f"trainer.max_epochs={e_unl}"],
                        ),
                    ],
                )
            ],
            args.seeds,
        )
        out["text"] = res
        sections.append(
            f"### Text: Amazon sentences, {n_lab} labelled, 400 test, {n_unl} unlabelled\n\n"
            + table("text", res)
        )
    out["seconds"] = round(time.time() - t0)
    if sections:
        out["sections"] = sections
        tag = "_".join(g for g in ("image", "text") if g in out)
        save_json(OUT / f"results_{tag}.json", out)
    else:  # --skip-image --skip-text: the tables of the saved results (e.g. two parallel runs)
        import json

        for f in sorted(OUT.glob("results_*.json")):
            saved = json.loads(f.read_text())
            sections += saved["sections"]
            out["seconds"] += saved["seconds"]
            out["command"] = out["command"] + f"; {saved['command']} ({saved['seconds'] // 60} min)"
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

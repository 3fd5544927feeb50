#!/usr/bin/env python
"""Distillation: students trained alone vs distilled vs distilled + unlabelled inputs.

    python scripts/bench_distill.py [--seeds 0 1 2] [--groups image image_ft text] [--resume]
                                    [--size 64] [--per-class 50] [--unlabeled 100]
                                    [--test-per-class 40] [--write-doc]

Runs the real ``tl`` executable (``tl train`` / ``tl finetune`` for teachers and for students
trained alone, ``tl distill`` for the rest), each in a subprocess, and reads their metrics.json.
Every number of the "Distillation" section of docs/benchmarks.md comes from here. Sized for a
shared 2-core CPU machine:

* Images: the shared CIFAR subset at ``--size`` px: ``--per-class`` labelled training images per
  class (the first files by name; 10% carved as val), the next ``--unlabeled`` per class as a flat
  folder of unlabelled inputs (``dataset.unlabeled_root``), the first ``--test-per-class`` test
  images per class.

  - group ``image``: teacher ``efficientnet_lite2`` (bundled ImageNet weights), frozen features +
    an L-BFGS-fitted head (``tl train``).
  - group ``image_ft``: teacher ``efficientnet_lite2`` fine-tuned (``tl finetune``, its defaults).
  - group ``image_ft_ls0``: the same teacher fine-tuned with ``label_smoothing=0`` (a teacher trained
    with label smoothing distils worse: Mueller, Kornblith, Hinton, NeurIPS 2019).
  - students, all fine-tuned end to end for 10 epochs (the ``tl distill`` default,
    ``strategy=finetune``): the command's default student (no ``backbone=``: the teacher's
    backbone cut to half its 21 blocks, ``backbone.depth=10``, starting from the teacher's weights),
    other cuts (``backbone.depth=K``), and ``efficientnet_lite0`` (a different backbone, from its
    own ImageNet weights). "Alone" is ``tl finetune`` of the same architecture from ImageNet
    weights (the same run serves both teachers' tables: no teacher is involved).
* Text (group ``text``): the shared Amazon sentences (a fixed shuffle: 200 labelled, 400 test,
  400 unlabelled). Teacher: fine-tuned MiniLM-L6 (``tl finetune modality=text``); students: its first
  2 and 3 layers (``backbone.depth=K``) fine-tuned, alone from MiniLM's pretrained first K layers or
  distilled from the fine-tuned teacher's first K (DistilBERT-style).
* Same budget per row: the same settings and the same number of optimizer steps: a row with
  unlabelled inputs runs proportionally fewer epochs over its larger train split ("+ unlabelled").
  The default student also gets "+ unlabelled, 10 epochs": what the bare command does (3x the
  steps), kept apart from the equal-budget rows. Each teacher is trained once (seed 0); every
  student row runs with each seed.
* Latency and speed-ups are measured inside each distill run (teacher and student timed in
  alternating rounds on the run's own inputs, medians); the tables show the median over runs.

``--resume`` reuses every run whose result an earlier invocation saved (``bench_result.json`` in
its run dir), so an interrupted benchmark continues where it stopped. Prints markdown tables;
``--write-doc`` rewrites the ``distill`` section of docs/benchmarks.md (between its
``<!-- BEGIN distill -->`` / ``<!-- END distill -->`` markers).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import statistics
import time
from pathlib import Path
from typing import Any

from _bench_util import (
    DEFAULT_DATA,
    ROOT,
    command_line,
    machine,
    md_table,
    run_tl,
    save_json,
    write_section,
)

OUT = ROOT / "build" / "bench" / "distill"
TEXT_CSV = (ROOT.parent / "shared" / "data" / "sentiment-amazon" / "amazon_cells.csv").resolve()
CPU = ["trainer.accelerator=cpu", "trainer.devices=1"]
RESUME = False
ONLY_SAVED = False
VARIANTS: list[str] = []  # --variants: run only these rows (e.g. '+ unlabelled')
EPOCHS = 10  # trainer.max_epochs of tl finetune / tl distill (configs/trainer/default.yaml)


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


def run(command: str, overrides: list[str], run_dir: Path) -> dict[str, Any] | None:
    """run_tl, or (``--resume``) the result an earlier invocation saved for this run dir; None
    for a run not saved yet under ``--only-saved``."""
    saved = run_dir / "bench_result.json"
    if (RESUME or ONLY_SAVED) and saved.is_file():
        r = json.loads(saved.read_text())
        if r.get("cmd_args") == [command, *overrides]:
            r["reused"] = True
            return r
    if ONLY_SAVED:
        return None
    # (run_tl adds overwrite=true to tl train / finetune: the benchmark reruns into its run dirs)
    extra = [] if command in ("train", "finetune") else ["overwrite=true"]
    r = run_tl(command, [*overrides, *extra], run_dir)
    r["cmd_args"] = [command, *overrides]
    save_json(saved, r)
    return r


def group(
    name: str,
    teacher_cmd: tuple[str, list[str]],
    students: list[tuple[str, list[tuple[str, str, list[str], str | None]]]],
    seeds: list[int],
) -> dict[str, Any]:
    """Teacher once, then each student's variants (name, command, overrides, shared run-dir
    name or None), per seed. A shared name puts the run outside the group's folder, so one run
    serves several groups (a student trained alone involves no teacher)."""
    out = OUT / name
    command, ov = teacher_cmd
    print(f"[{name}] teacher: tl {command} ...", flush=True)
    t = run(command, [*ov, "seed=0", *CPU], out / "teacher")
    if t is None:
        print(f"[{name}] teacher not run (--only-saved)", flush=True)
        return {"teacher": None, "rows": []}
    teacher_ckpt = out / "teacher" / "checkpoints" / "best.ckpt"
    print(
        f"[{name}] teacher test/acc {t['metrics']['test/acc']:.3f}  wall {t['wall_seconds']:.0f}s",
        flush=True,
    )
    results: dict[str, Any] = {"teacher": t, "rows": [], "teacher_ckpt": str(teacher_ckpt)}
    for label, variants in students:
        for variant, cmd, args, shared in variants:
            if VARIANTS and variant not in VARIANTS:
                continue
            args = [a.replace("TEACHER", str(teacher_ckpt)) for a in args]
            runs = []
            for s in seeds:
                base = OUT / "shared_runs" / shared if shared else out / label
                # a plain name: Hydra's override grammar reserves ( ) , and friends
                leaf = re.sub(
                    r"[^A-Za-z0-9_.-]+", "_", f"{base.name}-{variant}-s{s}".replace("+", "plus")
                )
                run_dir = base.parent / leaf
                print(f"[{name}] {label} {variant} seed {s} ...", flush=True)
                r = run(cmd, [*args, f"seed={s}", *CPU], run_dir)
                if r is None:
                    print("    not run (--only-saved)", flush=True)
                    continue
                m = r["metrics"]
                print(
                    f"    test/acc {m['test/acc']:.3f}  steps {m['defaults']['optimizer_steps']}  "
                    f"fit {m['fit_seconds']:.0f}s  wall {r['wall_seconds']:.0f}s"
                    + ("  (reused)" if r.get("reused") else ""),
                    flush=True,
                )
                r["run_dir"] = str(run_dir)
                runs.append(r)
            if runs:
                results["rows"].append({"student": label, "variant": variant, "runs": runs})
    return results


SPEED_KEYS = (
    "speedup_b1",
    "speedup_b32",
    "student_params",
    "teacher_params",
    "teacher_latency_ms_b1",
    "teacher_latency_ms_b32",
    "student_latency_ms_b1",
    "student_latency_ms_b32",
)


def table(res: dict[str, Any]) -> str:
    t = res["teacher"]
    tm = t["metrics"]
    alone: dict[str, float] = {}
    speed: dict[str, dict[str, list[float]]] = {}
    for row in res["rows"]:
        for r in row["runs"]:
            if "speedup_b1" in r["metrics"]:
                sp = speed.setdefault(row["student"], {k: [] for k in SPEED_KEYS})
                for k in SPEED_KEYS:
                    sp[k].append(r["metrics"][k])
    med = {s: {k: statistics.median(v) for k, v in d.items()} for s, d in speed.items()}
    # the teacher measured inside the distill runs of the default (same-backbone) student: the
    # same split and the same input pipeline as the teacher's own run
    in_run = [
        r["metrics"]["teacher/test/acc"]
        for row in res["rows"]
        for r in row["runs"]
        if "teacher/test/acc" in r["metrics"]
    ]
    t_acc = tm["test/acc"]
    rows = []
    for row in res["rows"]:
        accs = [r["metrics"]["test/acc"] for r in row["runs"]]
        mean = statistics.mean(accs)
        if row["variant"] == "alone":
            alone[row["student"]] = mean
        sp = med.get(row["student"], {})
        a = alone.get(row["student"])
        rows.append(
            [
                row["student"],
                row["variant"],
                str(len(accs)),
                mean_sd(accs),
                f"{100 * (mean - a):+.1f}" if row["variant"] != "alone" and a is not None else "",
                f"{100 * mean / t_acc:.0f}%",
                f"{sp.get('speedup_b1', float('nan')):.1f}x / {sp.get('speedup_b32', float('nan')):.1f}x",
                f"{sp.get('student_params', 0) / 1e6:.2f}M",
                str(row["runs"][0]["metrics"]["defaults"]["optimizer_steps"]),
                f"{statistics.mean(r['metrics']['fit_seconds'] for r in row['runs']):.0f}",
                f"{statistics.mean(r['wall_seconds'] for r in row['runs']):.0f}",
            ]
        )
    any_sp = next(iter(med.values()), {})
    in_run_s = (
        f"{min(in_run):.3f}-{max(in_run):.3f} measured inside the distill runs (through each "
        "student's input pipeline; the 'of teacher' column uses its own run's)"
        if in_run
        else "no distill run"
    )
    head = (
        f"Teacher `{tm['backbone']}` (`{t['cmd']}`): test acc **{t_acc:.3f}** in its own run "
        f"({t['wall_seconds']:.0f} s wall), {in_run_s}; "
        f"{any_sp.get('teacher_params', 0) / 1e6:.2f}M params, CPU "
        f"{any_sp.get('teacher_latency_ms_b1', float('nan')):.1f} ms/input at batch 1, "
        f"{any_sp.get('teacher_latency_ms_b32', float('nan')):.2f} at batch 32 (medians over the "
        "distill runs)."
    )
    return (
        head
        + "\n\n"
        + md_table(
            [
                "student",
                "trained",
                "seeds",
                "test acc (mean ± sd)",
                "vs alone (points)",
                "of teacher",
                "CPU speed-up b1 / b32",
                "params",
                "steps",
                "fit s",
                "wall s",
            ],
            rows,
            "llrrrrrrrrr",
        )
    )


def speed_table(res: dict[str, Any], inputs: dict[int, Any], rounds: dict[int, int]) -> str:
    """CPU latency per input of the teacher and of each student (one saved checkpoint each),
    measured here, in one process, in alternating rounds (T, S1, S2, ..., T, S1, ...); the
    minimum over rounds (the least disturbed pass on a shared machine) and the median."""
    import torch
    from torch import nn

    from tl_cli.tasks.loading import load_module

    def net(ckpt: Path) -> nn.Module:
        m, _ = load_module(ckpt)
        return nn.Sequential(m.backbone, m.head).cpu().eval()

    names, models = ["teacher"], []
    teacher_ckpt = Path(res["teacher_ckpt"])
    models.append(net(teacher_ckpt))
    for row in res["rows"]:
        if row["student"] in names:
            continue
        r = next((r for r in row["runs"] if r.get("run_dir")), None)
        if r is None:
            continue
        names.append(row["student"])
        models.append(net(Path(r["run_dir"]) / "checkpoints" / "best.ckpt"))
    stats: dict[int, list[tuple[float, float]]] = {}
    torch.manual_seed(0)
    from torch.utils.flop_counter import FlopCounterMode

    flops = []  # per input at batch 1: independent of the machine's load
    for m in models:
        with torch.inference_mode(), FlopCounterMode(display=False) as fc:
            m(inputs[1])
        flops.append(fc.get_total_flops())
    with torch.inference_mode():
        for b, x in inputs.items():
            for m in models:
                m(x)  # warm-up
            times: list[list[float]] = [[] for _ in models]
            for _ in range(rounds[b]):
                for i, m in enumerate(models):
                    t0 = time.perf_counter()
                    m(x)
                    times[i].append(1000 * (time.perf_counter() - t0) / b)
            stats[b] = [(min(ts), statistics.median(ts)) for ts in times]
    rows = []
    for i, n in enumerate(names):
        cells = [
            n,
            f"{sum(p.numel() for p in models[i].parameters()) / 1e6:.2f}M",
            f"{flops[i] / 1e6:.0f}M ({flops[0] / max(flops[i], 1):.1f}x fewer)",
        ]
        for b in inputs:
            mn, md = stats[b][i]
            t_mn, t_md = stats[b][0]
            cells += [f"{mn:.2f} / {md:.2f}", f"{t_mn / mn:.1f}x / {t_md / md:.1f}x"]
        rows.append(cells)
    heads = ["model", "params", "FLOPs/input (vs teacher)"]
    for b in inputs:
        heads += [f"ms/input b{b} (min / median)", f"speed-up b{b} (min / median)"]
    return md_table(heads, rows, "l" + "r" * (len(heads) - 1))


SPEED_HEAD = (
    "Speed measured again after the runs (`--speed`), all models in one process, alternating "
    "rounds, on the same inputs (images: random tensors at the bench size; text: test sentences, "
    "padded to the batch's longest); the minimum over rounds is the least disturbed pass on the "
    "shared machine, the median shows the noise:\n\n"
)


def text_batch(test_csv: Path, res: dict[str, Any], b: int) -> dict[str, Any]:
    """The first ``b`` test sentences, tokenised by the teacher's tokenizer (all students share it)."""
    import torch

    from tl_cli.modalities.text.backbone import get_tokenizer
    from tl_cli.tasks.loading import load_module

    m, _ = load_module(res["teacher_ckpt"])
    tok = get_tokenizer(m.backbone.preprocessing)
    texts = [r["text"] for r in csv.DictReader(test_csv.open())][:b]
    ids = [e.ids[:256] for e in tok.encode_batch(texts)]
    n = max(len(i) for i in ids)
    input_ids = torch.zeros(b, n, dtype=torch.long)
    mask = torch.zeros(b, n, dtype=torch.long)
    for k, i in enumerate(ids):
        input_ids[k, : len(i)] = torch.tensor(i)
        mask[k, : len(i)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def image_students(
    which: list[str], img: list[str], unl: Path, e_unl: int, shared_ok: bool
) -> list[tuple[str, list[tuple[str, str, list[str], str | None]]]]:
    """The image students: 'default' (lite2 cut to 10 blocks, the command's default), 'default10'
    (its '+ unlabelled' row with the command's 10 epochs), 'dK' (lite2 cut to K blocks), 'lite0'
    (efficientnet_lite0 whole). A student's rows after the first entry with its label reuse that
    entry's 'alone' row and speed-ups."""
    out = []
    u = f"dataset.unlabeled_root={unl}"
    for w in which:
        if w == "lite0":
            label, arch, kd = (
                "lite0 (whole)",
                ["backbone=efficientnet_lite0"],
                ["backbone=efficientnet_lite0"],
            )
        else:
            default = w.startswith("default")
            depth = 10 if default else int(w[1:])
            arch = ["backbone=efficientnet_lite2", f"backbone.depth={depth}"]
            kd = [] if default else [f"backbone.depth={depth}"]
            label = f"lite2 depth {depth}" + (" (default)" if default else "")
        alone_dir = "image-" + label.split(" (")[0].replace(" ", "_")
        variants: list[tuple[str, str, list[str], str | None]] = [
            ("alone", "finetune", [*img, *arch], alone_dir if shared_ok else None),
            ("distilled", "distill", ["teacher=TEACHER", *kd], None),
            (
                "+ unlabelled",
                "distill",
                ["teacher=TEACHER", *kd, u, f"trainer.max_epochs={e_unl}"],
                None,
            ),
        ]
        if w == "default10":  # the bare command with unlabelled inputs: 10 epochs, 3x the steps
            variants = [("+ unlabelled, 10 epochs", "distill", ["teacher=TEACHER", u], None)]
        out.append((label, variants))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--groups",
        nargs="+",
        default=["image", "image_ft", "text"],
        choices=["image", "image_ft", "image_ft_ls0", "text"],
    )
    ap.add_argument(
        "--image-students",
        nargs="+",
        default=["default", "d7", "lite0", "default10"],
        help="students of the frozen-feature Lite2 teacher: default, default10, dK, lite0",
    )
    ap.add_argument(
        "--image-ft-students",
        nargs="+",
        default=["default"],
        help="students of the fine-tuned Lite2 teacher (same choices)",
    )
    ap.add_argument("--text-depths", type=int, nargs="+", default=[2, 3])
    ap.add_argument(
        "--text-ablation",
        action="store_true",
        help="text: also distil with distill.alpha=0 (the teacher's init only) and with T=1",
    )
    ap.add_argument(
        "--speed",
        action="store_true",
        help="also time the teacher and one saved checkpoint of each student here (min of rounds)",
    )
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--unlabeled", type=int, default=100)
    ap.add_argument("--test-per-class", type=int, default=40)
    ap.add_argument("--text-epochs", type=int, default=5)
    ap.add_argument("--resume", action="store_true", help="reuse runs an earlier invocation saved")
    ap.add_argument(
        "--only-saved",
        action="store_true",
        help="run nothing: tables of the runs earlier invocations saved (rows show their seed count)",
    )
    ap.add_argument(
        "--variants",
        nargs="+",
        default=[],
        help="only these rows of each student: alone, distilled, '+ unlabelled' (default: all)",
    )
    ap.add_argument("--write-doc", action="store_true")
    args = ap.parse_args()
    global RESUME, ONLY_SAVED, VARIANTS
    RESUME, ONLY_SAVED, VARIANTS = args.resume, args.only_saved, args.variants
    t0 = time.time()
    out: dict[str, Any] = {
        "machine": machine(),
        "command": command_line(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    sections = []
    if {"image", "image_ft", "image_ft_ls0"} & set(args.groups):
        lab, unl, n_lab, n_unl = image_data(
            args.data, args.per_class, args.unlabeled, args.test_per_class
        )
        img = [
            "dataset=imagefolder",
            f"dataset.root={lab}",
            f"dataset.image_size={args.size}",
            "dataset.num_workers=0",
        ]
        e_unl = steps_epochs(EPOCHS, n_lab, n_unl)
        what = (
            f"CIFAR subset at {args.size} px, {n_lab} labelled (10% carved as val), {n_unl} "
            f"unlabelled, {10 * args.test_per_class} test"
        )
        for g, teacher, which, title in (
            (
                "image",
                ("train", [*img, "backbone=efficientnet_lite2"]),
                args.image_students,
                "teacher Lite2, frozen features + L-BFGS head",
            ),
            (
                "image_ft",
                ("finetune", [*img, "backbone=efficientnet_lite2"]),
                args.image_ft_students,
                "teacher Lite2 fine-tuned",
            ),
            (
                "image_ft_ls0",
                ("finetune", [*img, "backbone=efficientnet_lite2", "label_smoothing=0"]),
                args.image_ft_students,
                "teacher Lite2 fine-tuned without label smoothing",
            ),
        ):
            if g not in args.groups:
                continue
            tg = time.time()
            res = group(g, teacher, image_students(which, img, unl, e_unl, True), args.seeds)
            res["seconds"] = round(time.time() - tg)
            out[g] = res
            if res["teacher"] is not None:
                sections.append(f"### Images, {title}: {what}\n\n" + table(res))
                if args.speed:
                    import torch

                    x = {b: torch.randn(b, 3, args.size, args.size) for b in (1, 32)}
                    sections.append(SPEED_HEAD + speed_table(res, x, {1: 30, 32: 6}))
    if "text" in args.groups:
        d, unl, n_lab, n_unl = text_data()
        txt = ["modality=text", f"dataset.root={d}", "dataset.num_workers=0"]
        e, e_unl = args.text_epochs, steps_epochs(args.text_epochs, n_lab, n_unl)
        students = []
        for k in args.text_depths:
            kd = ["teacher=TEACHER", *txt, f"backbone.depth={k}"]
            students.append(
                (
                    f"MiniLM depth {k}",
                    [
                        (
                            "alone",
                            "finetune",
                            [*txt, f"backbone.depth={k}", f"trainer.max_epochs={e}"],
                            None,
                        ),
                        ("distilled", "distill", [*kd, f"trainer.max_epochs={e}"], None),
                        (
                            "+ unlabelled",
                            "distill",
                            [*kd, f"dataset.unlabeled_root={unl}", f"trainer.max_epochs={e_unl}"],
                            None,
                        ),
                    ]
                    + [  # diagnostics of the defaults (T 4, alpha 0.9), not a tuning sweep
                        (
                            f"distilled, {name}",
                            "distill",
                            [*kd, f"trainer.max_epochs={e}", override],
                            None,
                        )
                        for name, override in (
                            ("alpha 0 (CE only)", "distill.alpha=0"),
                            ("T 1", "distill.temperature=1"),
                        )
                        if args.text_ablation
                    ],
                )
            )
        tg = time.time()
        res = group("text", ("finetune", [*txt, f"trainer.max_epochs={e}"]), students, args.seeds)
        res["seconds"] = round(time.time() - tg)
        out["text"] = res
        if res["teacher"] is not None:
            sections.append(
                f"### Text: Amazon sentences, {n_lab} labelled (10% carved as val), 400 test, "
                f"{n_unl} unlabelled, {e} epochs\n\n" + table(res)
            )
            if args.speed:
                x = {b: text_batch(d / "test.csv", res, b) for b in (1, 32)}
                sections.append(SPEED_HEAD + speed_table(res, x, {1: 30, 32: 6}))
    out["seconds"] = round(time.time() - t0)
    # the wall time of every run the tables use (teachers included), whichever invocation ran it
    out["run_seconds"] = round(
        sum(
            (g["teacher"]["wall_seconds"] if g.get("teacher") else 0)
            + sum(r["wall_seconds"] for row in g["rows"] for r in row["runs"])
            for k, g in out.items()
            if k in ("image", "image_ft", "image_ft_ls0", "text")
        )
    )
    out["sections"] = sections
    save_json(OUT / f"results_{'_'.join(args.groups)}.json", out)
    body = "\n\n".join(sections)
    print()
    print(body)
    print(
        f"\n{out['seconds']} s this invocation; the runs behind the tables: {out['run_seconds']} s"
    )
    if args.write_doc:
        write_section(
            "distill",
            f"`{out['command']}`: the runs behind these tables took {out['run_seconds'] // 60} min "
            f"of wall time in all (sum over runs, teachers included). {out['machine']}\n\n" + body,
        )


if __name__ == "__main__":
    main()

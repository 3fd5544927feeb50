#!/usr/bin/env python
"""Text distillation at the product's default budget, on two text sets, for the KD settings.

    python scripts/bench_distill_text.py [--sets amazon topics] [--seeds 0 1 2] [--depth 2]
                                         [--kd 4:0.9 2:0.5] [--resume] [--write-doc]

What ``tl distill modality=text`` gives a user who changes nothing but the student, and which
temperature/alpha pair its default should be. Every run is the real ``tl`` executable with the
default budget (``trainer.max_epochs=auto``), so a row with unlabelled inputs runs the bare
command's epochs over its larger split (more steps than the row without; the "steps" column says
how many).

Two text sets, with a fixed split (labelled: 10% of it carved as val by ``tl``):

* ``amazon``: the shared Amazon review sentences (2 classes, sentiment); the split of
  ``scripts/bench_distill.py``: 200 labelled, 400 test, 400 unlabelled.
* ``topics``: the English part of the ChatterBot dialog corpus (``pip install
  chatterbot-corpus==1.3.3``, data only, BSD-3; or ``--topics-corpus DIR`` pointing at its
  ``data/english`` folder): every utterance of a conversation file becomes a sentence labelled
  with the file's topic. The six topics with at least 100 distinct utterances of three words or
  more (ai, coding, conversations, emotion, psychology, trivia; 6 classes, overlapping ones among
  them), 119 sentences each at random (the smallest topic's count): 30 labelled, 40 test,
  49 unlabelled per topic.

Per set: the teacher is ``tl finetune modality=text`` (MiniLM-L6, seed 0); the student is its first
``--depth`` layers (``backbone.depth``): alone (``tl finetune``, MiniLM's pretrained first layers),
distilled with each ``--kd T:alpha`` (``tl distill``, from the teacher's first layers), without
and with the set's unlabelled sentences (``dataset.unlabeled_root``). T and alpha are always given
explicitly, so the rows keep their meaning whatever the command's default is.

``--resume`` reuses every run whose result an earlier invocation saved (``bench_result.json`` in
its run dir, matched on the exact command). ``--write-doc`` rewrites the ``distill_text`` section
of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import time
from pathlib import Path
from typing import Any

import bench_distill as bd
from _bench_util import command_line, machine, md_table, save_json, write_section

OUT = bd.OUT / "text_kd"
TOPIC_MIN = 100  # a topic needs this many distinct sentences to be kept
PER_TOPIC = (30, 40, 49)  # labelled, test, unlabelled per topic


def topics_corpus(arg: Path | None) -> Path:
    if arg is not None:
        return arg
    try:
        import chatterbot_corpus
    except ImportError:
        raise SystemExit(
            "the 'topics' set needs the ChatterBot corpus: pip install chatterbot-corpus==1.3.3 "
            "(or --topics-corpus DIR with its data/english YAML files)"
        ) from None
    return Path(chatterbot_corpus.__file__).parent / "data" / "english"


def topics_data(corpus: Path) -> tuple[Path, Path, int, int, list[str]]:
    """(labelled dir with train.csv + test.csv, unlabelled .txt, counts, the kept topics)."""
    import yaml

    by_topic: dict[str, set[str]] = {}
    for f in sorted(corpus.glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        sents = by_topic.setdefault(f.stem, set())
        for conv in doc.get("conversations") or []:
            for u in conv or []:
                s = " ".join(str(u).split())
                if len(s.split()) >= 3:
                    sents.add(s)
    keep = sorted(t for t, s in by_topic.items() if len(s) >= TOPIC_MIN)
    n_lab, n_test, n_unl = PER_TOPIC
    rng = random.Random(0)
    train, test, unl = [], [], []
    for t in keep:
        s = sorted(by_topic[t])
        rng.shuffle(s)
        s = s[: n_lab + n_test + n_unl]
        train += [{"text": x, "label": t} for x in s[:n_lab]]
        test += [{"text": x, "label": t} for x in s[n_lab : n_lab + n_test]]
        unl += s[n_lab + n_test :]
    d = bd.OUT / "data" / "topics"
    d.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.csv", train), ("test.csv", test)):
        rng.shuffle(part)
        with (d / name).open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["text", "label"])
            w.writeheader()
            w.writerows(part)
    u = bd.OUT / "data" / "topics_unlabeled.txt"
    u.write_text("\n".join(unl) + "\n")
    return d, u, len(train), len(unl), keep


def rows_for(depth: int, kds: list[tuple[float, float]], unl: Path) -> list[tuple[str, str, list]]:
    """(row name, tl command, overrides beyond the set's); TEACHER is filled in by bd.group."""
    student = [f"backbone.depth={depth}"]
    rows = [("alone", "finetune", student)]
    for extra, tag in (([], "distilled"), ([f"dataset.unlabeled_root={unl}"], "+ unlabelled")):
        for t, a in kds:
            kd = [f"distill.temperature={t:g}", f"distill.alpha={a:g}"]
            rows.append(
                (
                    f"{tag}, T {t:g}, alpha {a:g}",
                    "distill",
                    ["teacher=TEACHER", *student, *kd, *extra],
                )
            )
    return rows


def table(res: dict[str, Any]) -> str:
    t_acc = res["teacher"]["metrics"]["test/acc"]
    alone = None
    out = []
    for row in res["rows"]:
        accs = [r["metrics"]["test/acc"] for r in row["runs"]]
        mean = statistics.mean(accs)
        if row["variant"] == "alone":
            alone = mean
        m0 = row["runs"][0]["metrics"]
        out.append(
            [
                row["variant"],
                " / ".join(f"{a:.3f}" for a in accs),
                f"**{mean:.3f}**",
                f"{100 * (mean - alone):+.1f}"
                if alone is not None and row["variant"] != "alone"
                else "",
                f"{100 * mean / t_acc:.0f}%",
                f"{m0['epochs']} / {m0['defaults']['optimizer_steps']}",
                f"{statistics.mean(r['wall_seconds'] for r in row['runs']):.0f}",
            ]
        )
    return md_table(
        [
            "student",
            "test acc per seed",
            "mean",
            "vs alone (points)",
            "of teacher",
            "epochs / steps",
            "wall s",
        ],
        out,
        "lrrrrrr",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", nargs="+", default=["amazon", "topics"], choices=["amazon", "topics"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--depth", type=int, default=2, help="the student: MiniLM's first K layers")
    ap.add_argument(
        "--kd",
        nargs="+",
        default=["4:0.9", "2:0.5"],
        help="T:alpha pairs to distil with (default: the image default 4:0.9, and 2:0.5)",
    )
    ap.add_argument("--topics-corpus", type=Path, default=None)
    ap.add_argument("--resume", action="store_true", help="reuse runs an earlier invocation saved")
    ap.add_argument("--write-doc", action="store_true")
    args = ap.parse_args()
    try:
        kds = [(float(k.split(":")[0]), float(k.split(":")[1])) for k in args.kd]
    except (IndexError, ValueError):
        raise SystemExit(f"--kd takes T:alpha pairs such as 4:0.9, not {args.kd}") from None
    bd.RESUME = args.resume
    bd.OUT = OUT  # bd.group puts each set's runs under OUT/<set>
    t0 = time.time()
    out: dict[str, Any] = {"machine": machine(), "command": command_line(), "sets": {}}
    sections = []
    for name in args.sets:
        if name == "amazon":
            d, unl, n_lab, n_unl = bd.text_data()
            what = f"Amazon review sentences (2 classes): {n_lab} labelled, 400 test, {n_unl} unlabelled"
        else:
            d, unl, n_lab, n_unl, keep = topics_data(topics_corpus(args.topics_corpus))
            what = (
                f"ChatterBot corpus topics ({len(keep)} classes: {', '.join(keep)}): {n_lab} "
                f"labelled, {len(keep) * PER_TOPIC[1]} test, {n_unl} unlabelled"
            )
        txt = ["modality=text", f"dataset.root={d}", "dataset.num_workers=0"]
        students = [
            (
                f"MiniLM depth {args.depth}",
                [(v, c, [*txt, *ov], None) for v, c, ov in rows_for(args.depth, kds, unl)],
            )
        ]
        tg = time.time()
        res = bd.group(name, ("finetune", txt), students, args.seeds)
        res["seconds"] = round(time.time() - tg)
        out["sets"][name] = res
        if res["teacher"] is None:
            continue
        tm = res["teacher"]["metrics"]
        sections.append(
            f"### {what}\n\nTeacher: MiniLM-L6 fine-tuned, test acc **{tm['test/acc']:.3f}** "
            f"({tm['epochs']} epochs). Student: its first {args.depth} layers.\n\n" + table(res)
        )
    out["seconds"] = round(time.time() - t0)
    # the wall time of every run the tables use (teachers included), whichever invocation ran it
    out["run_seconds"] = round(
        sum(
            (g["teacher"]["wall_seconds"] if g.get("teacher") else 0)
            + sum(r["wall_seconds"] for row in g["rows"] for r in row["runs"])
            for g in out["sets"].values()
        )
    )
    out["sections"] = sections
    save_json(OUT / "results.json", out)
    body = "\n\n".join(sections)
    print()
    print(body)
    print(f"\n{out['seconds']} s this invocation")
    if args.write_doc:
        write_section(
            "distill_text",
            f"`{out['command']}`: the runs behind these tables took {out['run_seconds'] // 60} min "
            f"of wall time in all (teachers included). {out['machine']}\n\n" + body,
        )


if __name__ == "__main__":
    main()

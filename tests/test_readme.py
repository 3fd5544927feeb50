"""Every `tl ...` line in the README's (and docs pages') fenced bash blocks runs.

The README's commands run for real, in-process through ``tl_cli.cli.main`` (what the ``tl``
script calls), on tiny data: ``~/data/flowers``, ``DIR`` and the like become the tiny image
folder, ``RUN`` a copy of the tiny trained run, ``photos/`` its test images, and a training
command gets the tiny-model overrides (TINY) appended. A command that would download (a
torchvision backbone, CIFAR, a GPU) is composed only (``--cfg job``), which still rejects an
unknown option or key. The docs pages' commands are composed only (cheap), except
``tl backbones``, which runs. Each must exit 0 unless EXPECTED_EXIT says otherwise.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, TINY, TINY_FEATURES
from .trained_run import LEARN, trained_run

RUN_FOR_REAL = [ROOT / "README.md"]
COMPOSE_ONLY = [
    ROOT / "docs" / f"{n}.md"
    for n in (
        "configuration",
        "strategies",
        "outputs",
        "failure_modes",
        "development",
        "pretrain",
        "adaptation",
        "distillation",
        "fewshot",
    )
]
HYDRA_COMMANDS = {
    "train",
    "finetune",
    "eval",
    "predict",
    "export",
    "pretrain",
    "distill",
    "fewshot",
    "zeroshot",
}
#: README commands that need real pretrained weights (lite0 + MiniLM): composed only here; their
#: real runs are tests/test_zeroshot.py's slow tests
COMPOSE_ONLY_WORDS = {"zeroshot"}
#: overrides that would download weights or data, or need a GPU / several processes
OFFLINE_UNSAFE = re.compile(
    r"^(backbone=(resnet|efficientnet_b|mobilenet|convnext|vit|torchvision)"
    r"|dataset=cifar|trainer=(gpu|ddp)|trainer\.accelerator=gpu|trainer\.devices=[2-9]"
    r"|hparams_search=)"
)
#: documented non-zero exits, by a substring of the command line
EXPECTED_EXIT: dict[str, int] = {}


def commands(path: Path) -> list[tuple[str, list[str]]]:
    """(id, argv after `tl`) for each `tl` line of the file's ```bash blocks."""
    out, in_bash = [], False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_bash = line.strip() == "```bash" and not in_bash
            continue
        if in_bash and line.lstrip().startswith("tl "):
            argv = shlex.split(line, comments=True)
            out.append((f"{path.name}:{n}", argv[1:]))
    return out


README_CMDS = [c for p in RUN_FOR_REAL for c in commands(p)]
DOCS_CMDS = [c for p in COMPOSE_ONLY for c in commands(p)]


def test_the_readme_has_its_newcomer_commands():
    words = [argv[0] for _, argv in README_CMDS]
    for word in ("train", "finetune", "eval", "predict", "export"):
        assert word in words, f"README has no `tl {word}` example"
    text = (ROOT / "README.md").read_text()
    assert "make train" in text and "make test" in text
    for page in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / page).exists(), page


@pytest.fixture(scope="module")
def places(tmp_path_factory, tiny_data):
    run, _ = trained_run(tmp_path_factory, tiny_data)
    tmp = tmp_path_factory.mktemp("readme")
    copy = tmp / "RUN"
    shutil.copytree(run, copy)  # resume and outputs write into it: never the shared run
    (tmp / "out").mkdir()
    return {"data": tiny_data, "run": copy, "photos": tiny_data / "test", "out": tmp / "out"}


def substitute(argv: list[str], p: dict) -> list[str]:
    """README placeholders -> the tiny data, the tiny run's copy, a temp output folder."""
    photo = next(iter(sorted(p["photos"].rglob("*.png"))))
    out = []
    for tok in argv:
        key, eq, val = tok.partition("=")
        if eq and key in ("dataset.root", "dataset.target_root", "dataset.unlabeled_root"):
            val = str(p["data"])
        elif eq and key == "inputs":
            val = val.replace("photos/", f"{p['photos']}/").replace("a.jpg", str(photo))
            val = val.replace("more/", f"{p['photos']}/")
        elif eq and key == "output":
            val = str(p["out"] / val)
        elif eq and re.match(r"^RUN\b", val):
            val = str(p["run"]) + val[3:]
        out.append(f"{key}{eq}{val}" if eq else tok)
    return out


def run_tl(argv: list[str], monkeypatch) -> int:
    from hydra.core.global_hydra import GlobalHydra

    from tl_cli import cli

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["tl", *argv])
    monkeypatch.delenv("TL_COMMAND", raising=False)
    try:
        cli.main(list(argv))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    finally:
        GlobalHydra.instance().clear()
    return 0


def expected(argv: list[str]) -> int:
    line = " ".join(argv)
    return next((code for key, code in EXPECTED_EXIT.items() if key in line), 0)


@pytest.mark.parametrize("argv", [a for _, a in README_CMDS], ids=[i for i, _ in README_CMDS])
def test_readme_command_runs(argv, places, monkeypatch, capsys):
    word, args = argv[0], substitute(argv, places)
    assert word in HYDRA_COMMANDS | {"backbones"}, f"unknown command in README: tl {word}"
    if word in HYDRA_COMMANDS and "--cfg" not in args:
        if word in COMPOSE_ONLY_WORDS or any(OFFLINE_UNSAFE.match(a) for a in args):
            args += ["--cfg", "job"]  # would download on this offline machine: compose only
        else:
            n = len(list(places["out"].iterdir()))
            if not any(a.startswith("hydra.run.dir=") for a in args):
                args.append(f"hydra.run.dir={places['out'] / f'run{n}'}")
            if word in ("train", "finetune"):
                tiny_keys = {t.partition("=")[0] for t in TINY}
                args = [a for a in args if a.partition("=")[0] not in tiny_keys] + TINY
                if any(a.startswith("ckpt_path=") for a in args):
                    args += [*LEARN, "trainer.max_epochs=5"]  # the trained run's config, +1 epoch
            if word == "pretrain":  # the tiny model, a few steps
                tiny_keys = {t.partition("=")[0] for t in TINY}
                args = [a for a in args if a.partition("=")[0] not in tiny_keys]
                args += [*TINY, "trainer.max_steps=2"]
            if word == "distill":  # the tiny run is the teacher; its data, one epoch
                args += ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.max_epochs=1"]
            if word == "fewshot":  # the tiny model's features, a few episodes
                args += [*TINY_FEATURES, "episodes=20"]
    code = run_tl(args, monkeypatch)
    err = capsys.readouterr().err
    assert code == expected(argv), f"tl {' '.join(args)} exited {code}:\n{err[-2000:]}"


@pytest.mark.parametrize("argv", [a for _, a in DOCS_CMDS], ids=[i for i, _ in DOCS_CMDS])
def test_docs_command_composes(argv, places, monkeypatch, capsys):
    word, args = argv[0], substitute(argv, places)
    assert word in HYDRA_COMMANDS | {"backbones"}, f"unknown command in docs: tl {word}"
    if word in HYDRA_COMMANDS and "--cfg" not in args:
        args += ["--cfg", "job"]
    if "-m" in args:  # Hydra refuses --cfg with -m: compose the sweep's first point instead
        from tl_cli.cli import COMMANDS

        from .conftest import compose_cfg

        first = [a if "[" in a or "'" in a else a.split(",")[0] for a in args[1:] if a != "-m"]
        compose_cfg([a for a in first if a not in ("--cfg", "job")], COMMANDS[word][0])
        return
    code = run_tl(args, monkeypatch)
    err = capsys.readouterr().err
    assert code == 0, f"tl {' '.join(args)} exited {code}:\n{err[-2000:]}"

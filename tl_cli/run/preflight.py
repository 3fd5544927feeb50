"""Before Hydra runs: the command line checked and composed once, so mistakes are one line.

Hydra reports a bad command line with its own traceback-like text (the grammar, the config
search path, a ``+key`` suggestion that would be silently ignored). ``preflight`` composes the
config with the user's overrides first (in a multirun: the first value of every sweep) and turns
every failure into one ``tl: error:`` line with a suggestion (exit 2):

* a bare word (``tl eval runs/fe/checkpoints/best.ckpt``): ``did you mean checkpoint=...?``;
* argparse habits (``--epochs 5``, ``--lr 1e-3``): the override to use;
* a misspelt option or key (``strategy=finetuning``, ``trainer.max_epoch=2``): the closest names;
* a key added with ``+`` that nothing reads (``+epochs=1``, ``+trainer.max_epoch=2``).

It also rewrites a few things a newcomer types: ``~`` in values is expanded; ``checkpoint=RUN``
(a run dir) becomes ``RUN/checkpoints/best.ckpt`` (``ckpt_path=RUN``: ``last.ckpt``); and
``dataset.root=DIR`` without ``dataset=`` selects the task's folder dataset instead of the
built-in sample.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any

from tl_cli.core.errors import TLError

#: Hydra flags that take a value, and flags that do not.
FLAGS_WITH_VALUE = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
}
FLAGS = {"-m", "--multirun", "-r", "--run", "--resolve"}
#: flags after which tl does not check anything (help, completion, rerun)
PASS_THROUGH = {
    "-h",
    "--help",
    "--hydra-help",
    "--version",
    "-i",
    "--info",
    "-sc",
    "--shell-completion",
    "--experimental-rerun",
}

#: argparse habits -> the override that does it (commands that differ are handled below)
HABITS = {
    "epochs": "trainer.max_epochs",
    "max-epochs": "trainer.max_epochs",
    "num-epochs": "trainer.max_epochs",
    "lr": "optimizer.lr",
    "learning-rate": "optimizer.lr",
    "wd": "optimizer.weight_decay",
    "weight-decay": "optimizer.weight_decay",
    "batch-size": "dataset.batch_size",
    "bs": "dataset.batch_size",
    "workers": "dataset.num_workers",
    "num-workers": "dataset.num_workers",
    "image-size": "dataset.image_size",
    "img-size": "dataset.image_size",
    "data": "dataset.root",
    "data-dir": "dataset.root",
    "root": "dataset.root",
    "dataset": "dataset",
    "model": "backbone",
    "arch": "backbone",
    "backbone": "backbone",
    "strategy": "strategy",
    "head": "head",
    "optimizer": "optimizer",
    "scheduler": "scheduler",
    "seed": "seed",
    "gpus": "trainer.devices",
    "devices": "trainer.devices",
    "accelerator": "trainer.accelerator",
    "precision": "trainer.precision",
    "label-smoothing": "label_smoothing",
    "resume": "ckpt_path",
    "checkpoint": "checkpoint",
    "ckpt": "checkpoint",
    "output-dir": "hydra.run.dir",
    "out-dir": "hydra.run.dir",
    "split": "split",
    "inputs": "inputs",
    "input": "inputs",
    "output": "output",
    "format": "format",
    "topk": "topk",
}
#: open dicts: any key may be added with + under these
OPEN = ("hydra", "callbacks", "fail_under", "fail_over")
#: the deepest folder above the run dir that existed before this command (set by the check of
#: hydra.run.dir): empty folders below it that a failed run made are removed again (tl_cli.cli)
EXISTING_ANCESTOR: Path | None = None
#: component groups: the registries check their options (one line naming the option)
REGISTRY_CHECKED = ("backbone", "head", "strategy", "optimizer", "scheduler", "dataset", "task")


#: the modality group's options (configs/modality/): ``task=`` named them before tl 0.2
MODALITY_NAMES = ("image", "text", "audio")


def _habit(name: str, command: str) -> str | None:
    target = HABITS.get(name)
    if target == "checkpoint" and command in ("train", "finetune"):
        return "ckpt_path"
    if target == "output" and command in ("train", "finetune", "eval"):
        return "hydra.run.dir"
    return target


def _say(msg: str) -> None:
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"tl: {msg}", flush=True)


def _quote(value: str) -> str:
    """A Hydra override value: bare when the grammar allows it, else single-quoted."""
    if re.fullmatch(r"[A-Za-z0-9_/.:\-+@%]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _split_override(o: str) -> tuple[str, str, str] | None:
    """('+'|'++'|'~'|'', key, value) of ``key=value``, or None for a bare word."""
    m = re.match(r"^(\+\+|\+|~)?([A-Za-z_][\w.\-/@]*)=(.*)$", o, re.S)
    if not m:
        return None
    return m.group(1) or "", m.group(2), m.group(3)


def _expand_home(value: str) -> str:
    """``~`` and ``~/...`` expanded (also in a comma-separated sweep); other values unchanged."""
    parts = (
        value.split(",") if "," in value and not value.startswith(("[", "{", "'", '"')) else [value]
    )
    if not any(p.startswith("~") for p in parts):
        return value
    return ",".join(_quote(os.path.expanduser(p)) if p.startswith("~") else p for p in parts)


def _flatten(node: Any, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig

    out: list[str] = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            key = f"{prefix}.{k}" if prefix else str(k)
            out.append(key)
            child = node._get_node(k)
            if isinstance(child, DictConfig) and not child._is_none():
                out += _flatten(child, key)
    return out


def _closest(word: str, options: list[str], n: int = 3) -> list[str]:
    """Closest full keys, matching the whole key or its last part."""
    close = difflib.get_close_matches(word, options, n=n, cutoff=0.6)
    leaf = word.rsplit(".", 1)[-1]
    by_leaf = {o.rsplit(".", 1)[-1]: o for o in options}
    for m in difflib.get_close_matches(leaf, list(by_leaf), n=n, cutoff=0.75):
        if by_leaf[m] not in close:
            close.append(by_leaf[m])
    return close[:n]


def trainer_params() -> list[str]:
    """``pytorch_lightning.Trainer``'s arguments, without importing Lightning."""
    from tl_cli.run.validate import TRAINER_ARGS

    return list(TRAINER_ARGS)


class Preflight:
    def __init__(self, command: str, config_name: str, config_dir: str) -> None:
        self.command = command
        self.config_name = config_name
        self.config_dir = config_dir
        self.search: list[str] = []  # --config-dir

    # ------------------------------------------------------------------ compose
    def compose(self, overrides: list[str]) -> Any:
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        extra = []
        if self.search and not any(o.startswith("hydra.searchpath=") for o in overrides):
            extra = ["hydra.searchpath=[" + ",".join(f"file://{d}" for d in self.search) + "]"]
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=self.config_dir, version_base="1.3"):
                return compose(
                    config_name=self.config_name,
                    overrides=[*overrides, *extra],
                    return_hydra_config=True,
                )
        finally:
            GlobalHydra.instance().clear()

    def groups(self) -> list[str]:
        return sorted(p.name for p in Path(self.config_dir).iterdir() if p.is_dir())

    # ------------------------------------------------------------------ errors
    def bare_word(self, word: str) -> TLError:
        p = Path(os.path.expanduser(word))
        if self.command in ("eval", "predict", "export") and (
            word.endswith(".ckpt") or (p.is_dir() and (p / "checkpoints").is_dir())
        ):
            return TLError(f"{word!r} is not an override: did you mean checkpoint={word}?")
        if self.command == "predict" and p.exists():
            return TLError(f"{word!r} is not an override: did you mean inputs={word}?")
        if self.command in ("train", "finetune"):
            if word.endswith(".ckpt"):
                return TLError(
                    f"{word!r} is not an override: did you mean ckpt_path={word} (resume)?"
                )
            if p.is_dir():
                return TLError(f"{word!r} is not an override: did you mean dataset.root={word}?")
        for g in self.groups():
            if (Path(self.config_dir) / g / f"{word}.yaml").is_file():
                return TLError(f"{word!r} is not an override: did you mean {g}={word}?")
        return TLError(
            f"{word!r} is not an override: tl {self.command} takes key=value overrides "
            f"(tl {self.command} --help lists them)"
        )

    def flag(self, flag: str, value: str | None) -> TLError:
        name = flag.lstrip("-").split("=", 1)[0].lower().replace("_", "-")
        target = _habit(name, self.command)
        v = value if value is not None else "VALUE"
        if target:
            return TLError(
                f"{flag} is not an option: tl takes key=value overrides; use {target}={v}"
            )
        return TLError(
            f"{flag} is not an option: tl takes key=value overrides (group=option, key=value); "
            f"tl {self.command} --help lists them"
        )

    def translate(self, e: Exception, overrides: list[str]) -> TLError:
        """A Hydra composition error as one line with a suggestion."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        msg = str(e)
        name = type(e).__name__
        if name == "OverrideParseException":
            parser = OverridesParser.create()
            for o in overrides:
                try:
                    parser.parse_override(o)
                except Exception as pe:  # noqa: BLE001 - the override that does not parse
                    if _split_override(o) is None:
                        return self.bare_word(o)
                    first = str(pe).splitlines()[0]
                    return TLError(
                        f"cannot read the override {o!r} ({first}); quote a value with spaces or "
                        f"special characters: key='value'"
                    )
            return TLError(f"cannot read the command line: {msg.splitlines()[0]}")
        m = re.search(r"Could not find '([^']+)/([^']+)'", msg)
        if name == "MissingConfigException" and m:
            group, option = m.group(1), m.group(2)
            avail = re.findall(r"^\t(\S+)$", msg.split("Config search path")[0], re.M)
            close = difflib.get_close_matches(option, avail, n=3, cutoff=0.5)
            hint = f" (did you mean {' or '.join(f'{group}={c}' for c in close)}?)" if close else ""
            return TLError(
                f"{group}={option} is not an option of {group}{hint}; options: {', '.join(avail)}"
            )
        m = re.search(r"Could not override '([^']+)'", msg)
        if m:
            key = m.group(1)
            value = next(
                (s[2] for o in overrides if (s := _split_override(o)) and s[1] == key), "VALUE"
            )
            return self.unknown_key(key, value, overrides)
        m = re.search(r"An item is already at '([^']+)'", msg)
        if m:
            return TLError(f"{m.group(1)} is already a setting: drop the + ({m.group(1)}=...)")
        m = re.search(r"Ambiguous value for argument '([^']+)'", msg)
        if m:
            return TLError(
                f"{m.group(1)} is a sweep: add -m (tl {self.command} -m {m.group(1)}), "
                f"or quote it to mean a string: key='a,b'"
            )
        first = msg.strip().splitlines()[0] if msg.strip() else name
        return TLError(f"{first}")

    def unknown_key(
        self, key: str, value: str, overrides: list[str], plus: bool = False
    ) -> TLError:
        """``key`` is not in the config: the closest keys, or the ``+`` form a Trainer accepts."""
        others = [o for o in overrides if (s := _split_override(o)) is None or s[1] != key]
        try:
            known = [k for k in _flatten(self.compose(others)) if not k.startswith("hydra")]
        except Exception:  # noqa: BLE001 - suggestions are best effort
            known = []
        parent, _, leaf = key.rpartition(".")
        if parent == "trainer":
            params = trainer_params()
            if leaf in params and not plus:
                return TLError(
                    f"trainer.{leaf} is not in the trainer config: add it with +trainer.{leaf}={value}"
                )
            known += [f"trainer.{p}" for p in params if f"trainer.{p}" not in known]
        habit = _habit(key.lower().replace("_", "-"), self.command) if not parent else None
        close = [habit] if habit else _closest(key, known)
        if parent:
            close = [c for c in close if c.startswith(parent + ".")] or close
        hint = f" (did you mean {' or '.join(f'{c}={value}' for c in close)}?)" if close else ""
        where = f"a key of {parent}" if parent else f"a tl {self.command} setting"
        return TLError(f"{'+' if plus else ''}{key}={value}: {key} is not {where}{hint}")

    # ------------------------------------------------------------------ the check
    def run(self, args: list[str]) -> list[str]:
        if PASS_THROUGH & set(args) or any(a.startswith("--experimental-rerun") for a in args):
            return args
        out: list[str] = []
        overrides: list[str] = []
        multirun = False
        i = 0
        while i < len(args):
            a = args[i]
            if a in FLAGS_WITH_VALUE:
                if a in ("--config-dir", "-cd") and i + 1 < len(args):
                    self.search.append(str(Path(os.path.expanduser(args[i + 1])).resolve()))
                out += args[i : i + 2]
                i += 2
                continue
            if a.split("=", 1)[0] in FLAGS_WITH_VALUE:
                if a.split("=", 1)[0] in ("--config-dir", "-cd"):
                    self.search.append(str(Path(os.path.expanduser(a.split("=", 1)[1])).resolve()))
                out.append(a)
                i += 1
                continue
            if a in FLAGS:
                multirun = multirun or a in ("-m", "--multirun")
                out.append(a)
                i += 1
                continue
            if a.startswith("-") and not re.match(r"^-\d", a):
                value = a.split("=", 1)[1] if "=" in a else None
                if value is None and i + 1 < len(args) and "=" not in args[i + 1]:
                    value = args[i + 1]
                raise self.flag(a, value)
            s = _split_override(a)
            if s is None:
                raise self.bare_word(a)
            prefix, key, value = s
            if key == "task" and not prefix and value in MODALITY_NAMES:
                # tl 0.1's spelling: task= picked the modality; task= now names what is learned
                _say(
                    f"task={value} is now spelled modality={value} (task=classification is the default)"
                )
                key = "modality"
            value = _expand_home(value)
            if key in ("checkpoint", "ckpt_path", "teacher") and not prefix:
                value = self.run_dir_checkpoint(key, value)
            a = f"{prefix}{key}={value}"
            overrides.append(a)
            out.append(a)
            i += 1
        first = [self.first_value(o) for o in overrides] if multirun else overrides
        task = self.teacher_task(overrides)
        if task:  # tl distill: the modality group follows the teacher's
            out.insert(next(i for i, a in enumerate(out) if a in overrides), task)
            overrides.insert(0, task)
            first = [self.first_value(o) for o in overrides] if multirun else overrides
        try:
            cfg = self.compose(first)
        except Exception as e:  # noqa: BLE001 - Hydra's errors, translated
            raise self.translate(e, first) from None
        self.check_run_dir(cfg, multirun)
        self.check_earlier_run(cfg, multirun)
        added = self.folder_dataset(cfg, overrides)
        if added:
            at = next(i for i, a in enumerate(out) if a in overrides)
            out.insert(at, added)  # with the overrides (Hydra's flags may follow them)
            first.append(added)
            cfg = self.compose(first)
        self.check_added_keys(cfg, first)
        return out

    def teacher_task(self, overrides: list[str]) -> str | None:
        """``modality=<the teacher's>`` for tl distill when the command line names none."""
        if self.command != "distill":
            return None
        keys = {s[1]: s[2] for o in overrides if (s := _split_override(o))}
        if "modality" in keys or "teacher" not in keys:
            return None
        teacher = os.path.expanduser(keys["teacher"].strip("'\""))
        from tl_cli.core.paths import checkpoint_problem

        if checkpoint_problem(teacher):
            return None  # tl distill reports it, in one line, before torch loads
        try:
            from tl_cli.core.checkpoint import read_checkpoint

            meta = read_checkpoint(teacher).get("tl", {})
        except Exception:  # noqa: BLE001 - tl distill itself reports a bad teacher, in one line
            return None
        modality = meta.get("modality", "image")
        return (
            f"modality={modality}"
            if isinstance(modality, str) and modality in MODALITY_NAMES
            else None
        )

    def check_run_dir(self, cfg: Any, multirun: bool) -> None:
        """The run (sweep) dir must be a folder tl can create and write in."""
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        try:
            raw = str(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir)
        except Exception:  # noqa: BLE001 - an interpolation only Hydra's run can resolve
            return
        p = Path(os.path.expanduser(raw)).absolute()
        if p.exists() and not p.is_dir():
            raise TLError(
                f"{key}={raw} is not a folder ({'a device' if not p.is_file() else 'a file'}): choose a folder for the run's outputs"
            )
        anc = p
        while not anc.exists() and anc != anc.parent:
            anc = anc.parent
        global EXISTING_ANCESTOR
        EXISTING_ANCESTOR = anc  # folders below it are this run's to tidy (core.outputs)
        if not anc.is_dir():
            raise TLError(f"{key}={raw}: {anc} is a file, so the folder cannot be created")
        if not os.access(anc, os.W_OK | os.X_OK):
            raise TLError(
                f"{key}={raw}: cannot write in {anc} (read-only or no permission); choose another {key}"
            )

    def check_earlier_run(self, cfg: Any, multirun: bool) -> None:
        """A run (sweep) dir that holds an earlier run's outputs is refused here, before Hydra
        writes ``.hydra/{config,overrides,hydra}.yaml`` into it (a refused rerun, or ``tl predict
        hydra.run.dir=<a train run>``, would otherwise rewrite that run's recorded config). The
        commands check again before they write (`tl_cli.core.outputs.claim_run_dir`), with the same
        list of outputs."""
        from tl_cli.core.outputs import refuse_earlier_run, refuse_earlier_sweep

        try:
            raw = str(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir)
            overwrite = bool(cfg.get("overwrite", False))
            resume = cfg.get("ckpt_path") if self.command in ("train", "finetune") else None
        except Exception:  # noqa: BLE001 - an interpolation only Hydra's run can resolve
            return
        d = Path(os.path.expanduser(raw))
        if multirun:
            refuse_earlier_sweep(d, overwrite)
        else:
            refuse_earlier_run(d, overwrite, resume)

    def first_value(self, o: str) -> str:
        """A sweep override reduced to its first value (what job 0 composes)."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        try:
            ov = OverridesParser.create().parse_override(o)
        except Exception:  # noqa: BLE001 - reported by compose
            return o
        if not ov.is_sweep_override():
            return o
        try:
            v = next(iter(ov.sweep_string_iterator()))
        except Exception:  # noqa: BLE001 - range/interval sweeps: leave to Hydra
            return o
        return f"{o.split('=', 1)[0]}={v}"

    def run_dir_checkpoint(self, key: str, value: str) -> str:
        raw = value.strip("'\"")
        p = Path(os.path.expanduser(raw))
        name = "best.ckpt" if key in ("checkpoint", "teacher") else "last.ckpt"
        for cand in (p / "checkpoints" / name, p / name):
            if p.is_dir() and cand.is_file():
                _say(f"{key}={raw} is a run directory: using {cand}")
                return _quote(str(cand))
        return value

    def folder_dataset(self, cfg: Any, overrides: list[str]) -> str | None:
        """``dataset=<folder dataset>`` when a root is given for a dataset that has none."""
        if self.command not in ("train", "finetune"):
            return None
        keys = [s for o in overrides if (s := _split_override(o))]
        if not any(k == "dataset.root" for _, k, _ in keys) or any(
            k == "dataset" for _, k, _ in keys
        ):
            return None
        choices = cfg.hydra.runtime.choices
        choice = choices.get("dataset")
        own = None
        for d in [self.config_dir, *self.search]:
            f = Path(d) / "dataset" / f"{choice}.yaml"
            if f.is_file():
                from omegaconf import OmegaConf

                own = OmegaConf.load(f)
                break
        if own is None or own.get("root", "x") is not None:
            return None  # a dataset that reads a root of its own (imagefolder, cifar10, ...)
        from tl_cli.modalities.base import get_modality

        modality = str(choices.get("modality") or "image")
        try:
            folder = get_modality(modality).folder_dataset
        except TLError:
            raise TLError(
                f"dataset.root is not read by dataset={choice}: add dataset=<a folder dataset>"
            ) from None
        _say(f"dataset.root given: using dataset={folder} (not the built-in dataset={choice})")
        return f"dataset={folder}"

    def check_added_keys(self, cfg: Any, overrides: list[str]) -> None:
        """Keys added with ``+`` that no component reads are an error, not silently kept."""
        groups = set(self.groups())
        plus = [
            (o, s)
            for o in overrides
            if (s := _split_override(o)) and s[0] in ("+", "++") and s[1] not in groups
        ]
        if not plus:
            return
        params: list[str] | None = None
        for o, (prefix, key, value) in plus:
            top = key.split(".", 1)[0]
            if top in OPEN or top in REGISTRY_CHECKED:
                continue
            if top == "trainer" and key.count(".") == 1:
                params = params if params is not None else trainer_params()
                if key.split(".", 1)[1] in params:
                    continue
            if top == "logger":
                continue  # the logger's own constructor names a bad key
            if prefix == "++":
                base = [x for x in overrides if x != o]
                try:
                    had = key in _flatten(self.compose(base))
                except Exception:  # noqa: BLE001
                    had = True
                if had:
                    continue
            raise self.unknown_key(key, value, [x for x in overrides if x != o], plus=True)


def preflight(command: str, config_name: str, config_dir: str, args: list[str]) -> list[str]:
    """The command line to hand Hydra, or exit 2 with one line."""
    if os.environ.get("LOCAL_RANK") not in (None, "0"):
        return args  # DDP children re-run a command rank 0 already checked
    try:
        return Preflight(command, config_name, config_dir).run(args)
    except TLError as e:
        print(f"tl: error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None

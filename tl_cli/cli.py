"""`tl <command> [overrides]`: dispatch to a Hydra app. No logic lives here."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from tl_cli import __version__

#: command -> (Hydra config name, tl_cli module whose ``run(cfg)`` it calls, one-line help)
COMMANDS = {
    "train": ("train", "train", "train a head (and optionally the backbone) on your data"),
    "finetune": ("finetune", "train", "tl train with strategy=finetune: the whole network trains"),
    "eval": (
        "eval",
        "evaluate",
        "score a checkpoint: tl eval checkpoint=RUN/checkpoints/best.ckpt",
    ),
    "predict": (
        "predict",
        "predict",
        "label inputs: tl predict checkpoint=CKPT inputs=DIR|FILE|GLOB output=preds.csv",
    ),
    "export": (
        "export",
        "export",
        "write ONNX / TorchScript / safetensors + a JSON sidecar: tl export checkpoint=CKPT format=onnx",
    ),
    "fewshot": (
        "fewshot",
        "fewshot",
        "episodic N-way K-shot accuracy: tl fewshot dataset.root=DIR n_shot=[1,5]",
    ),
    "zeroshot": (
        "zeroshot",
        "zeroshot",
        "a classifier from class names alone: tl zeroshot dataset.root=DIR",
    ),
    "distill": (
        "distill",
        "distill",
        "train a small student on a trained teacher: tl distill teacher=RUN/checkpoints/best.ckpt",
    ),
    "pretrain": (
        "pretrain",
        "pretrain",
        "self-supervised pretraining on unlabelled images: tl pretrain dataset.root=DIR",
    ),
    "backbones": (
        None,
        None,
        "list backbones (name, source, params, size, offline weights): tl backbones [filter]",
    ),
}

USAGE = (
    f"""tl {__version__}: transfer learning for image, text and audio classifiers (Hydra + Lightning)

usage: tl <command> [hydra overrides...]

commands:
"""
    + "\n".join(f"  {k:<9} {v[2]}" for k, v in COMMANDS.items())
    + """

Every word after the command is a Hydra override (group=option, key=value); Hydra's flags work
too: --help (config groups and options), --cfg job, -m/--multirun, hydra.run.dir=DIR.

examples:
  tl train                                    # efficientnet_lite0 + built-in sample, offline
  tl train dataset=imagefolder dataset.root=~/data/flowers backbone=resnet50
  tl finetune dataset.root=~/data/flowers dataset=imagefolder trainer.max_epochs=5
  tl eval checkpoint=outputs/train/<run>/checkpoints/best.ckpt fail_under.acc=0.9
  tl train -m optimizer.lr=1e-3,3e-4 strategy=feature_extraction,finetune
  tl predict checkpoint=RUN/checkpoints/best.ckpt inputs='photos/*.jpg' output=preds.csv topk=3
  tl export checkpoint=RUN/checkpoints/best.ckpt format=onnx output=model.onnx
  tl backbones resnet
  tl train dataset.root=~/data/src dataset.target_root=~/data/new_domain adapt=dann
  tl distill teacher=RUN dataset.unlabeled_root=~/data/unlabelled
  tl fewshot dataset.root=~/data/classes n_way=5 n_shot=[1,5]
  tl zeroshot dataset.root=~/photos
"""
)


def config_dir() -> str:
    """configs/ ships in the wheel as tl_cli/configs; a source checkout uses the top-level one."""
    here = Path(__file__).resolve().parent
    for cand in (here / "configs", here.parent / "configs"):
        if (cand / "train.yaml").is_file():
            from tl_cli.run.gates import register_configs

            register_configs()  # open fail_under/fail_over dicts (configs list them in defaults)
            return str(cand)
    raise SystemExit("tl: error: configs not found (broken install?)")


def _task(command: str):
    import importlib

    from tl_cli.core.errors import report_errors
    from tl_cli.run.sweep import keep_sweeping, objective

    @report_errors
    @keep_sweeping  # multirun: a failed job is recorded and the sweep goes on
    def task(cfg):  # noqa: ANN001 - Hydra passes a DictConfig
        if os.environ.get("LOCAL_RANK", "0") == "0":
            # a first line before the imports and the data scan (seconds on a cold start); a
            # command told where to write (output=) names that: its run dir is then not kept
            where = cfg.get("output") or cfg.get("output_dir")
            print(f"tl {command}: {where}", flush=True)
        module = COMMANDS[command][1]
        try:
            from tl_cli.run.early import check_before_imports

            check_before_imports(command, cfg)  # missing paths, bad values: before torch loads
            run = importlib.import_module(f"tl_cli.commands.{module}").run
            return objective(cfg, run(cfg))  # a float only for sweepers (optimized_metric set)
        finally:
            from tl_cli.core.outputs import discard_if_untouched, release_run_dir

            release_run_dir()  # the run dir's lock, also after a failure (multirun: next job)
            if os.environ.get("LOCAL_RANK", "0") == "0":
                # failed before writing anything, or wrote elsewhere: no empty run dir left
                _discard(cfg, discard_if_untouched)

    return task


#: when this process started (a run dir Hydra made since then, holding nothing else, is ours)
_STARTED = time.time()


def _discard(cfg, discard) -> None:  # noqa: ANN001 - a DictConfig and core.outputs' function
    """Remove the run dir Hydra made for this job if nothing else was written into it (a
    multirun job keeps its dir: a failed one records failed.json there)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return
        out, job = hc.runtime.output_dir, hc.job.name
    except Exception:  # noqa: BLE001 - not inside a Hydra run: nothing Hydra made to tidy
        return
    if out:
        from tl_cli.run.preflight import EXISTING_ANCESTOR

        discard(out, job, _STARTED - 1.0, EXISTING_ANCESTOR)


def main(argv: list[str] | None = None) -> None:
    """``tl ARGS``. A reader that stops early (``tl train --help | head``) ends tl quietly, with
    the shell's exit code for a closed pipe (141), not a traceback."""
    try:
        _main(argv)
    except BrokenPipeError:
        # Python's recipe: point stdout at devnull so the flush at exit does not raise again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(141) from None


def _main(argv: list[str] | None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    prog = sys.argv[0]
    if args and args[0] == "backbones":  # a plain command, no Hydra
        from tl_cli.commands.backbones import main as list_backbones

        raise SystemExit(list_backbones(args[1:]))
    if args and args[0] in COMMANDS:
        command = args.pop(0)
        os.environ["TL_COMMAND"] = command  # Lightning's DDP launcher re-runs argv[0] + overrides
    elif os.environ.get("TL_COMMAND") in COMMANDS and "LOCAL_RANK" in os.environ:
        command = os.environ["TL_COMMAND"]
    elif not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    elif args[0] in ("-V", "--version"):
        print(f"tl {__version__}")
        return
    else:
        print(
            f"tl: error: unknown command {args[0]!r}; commands: {', '.join(COMMANDS)} (tl --help)",
            file=sys.stderr,
        )
        raise SystemExit(2)

    from tl_cli.run.sweep import check_search_args

    check_search_args(args)  # hparams_search=optuna: -m and the plugin, or one clear line
    import hydra

    from tl_cli.run.preflight import preflight

    config_name = COMMANDS[command][0]
    # Hydra's errors as one line with a suggestion; ~, run dirs and dataset.root made to work
    args = preflight(command, config_name, config_dir(), args)
    sys.argv = [prog, *args]
    app = hydra.main(config_path=config_dir(), config_name=config_name, version_base="1.3")(
        _task(command)
    )
    app()


if __name__ == "__main__":
    main()

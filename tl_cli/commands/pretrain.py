"""`tl pretrain`: self-supervised continued pretraining of an image backbone on unlabelled images.

SimCLR (``tl_cli.transfer.simclr``): two augmented views of each image, NT-Xent; the loop is
Lightning's Trainer.

Continued pretraining starts gently from the backbone's pretrained (ImageNet) weights: BatchNorm
keeps its pretrained statistics by default (``pretrain.bn=frozen``: CPU batches are small, and
batch statistics of one small batch would drift), the backbone's LR is a tenth of the head's and
stays at zero while the freshly initialised projection head warms up (``pretrain.head_warmup_steps``).

Writes into the run dir: ``backbone.safetensors`` (the backbone's state dict, in the naming that
``backbone.weights_path=`` loads), ``pretrain.json`` (backbone, method, data, steps, loss summary)
and ``pretrain_curves.png`` (the loss per step). ``tl train init=RUN`` (or
``backbone.weights_path=RUN/backbone.safetensors``) starts from it.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

import tl_cli.tasks.components  # noqa: F401 - every registry complete
from tl_cli.core.console import interactive, progress, say, warn
from tl_cli.core.errors import TLError
from tl_cli.core.outputs import (
    check_output,
    claim_run_dir,
    earlier_outputs,
    release_run_dir,
    write_json,
)
from tl_cli.core.registry import plain
from tl_cli.modalities.backbones import build_backbone, count_params
from tl_cli.transfer.simclr import (
    SIDECAR,
    WEIGHTS_FILE,
    SimCLRModule,
    TwoViews,
    save_backbone,
    view_transform,
)

CURVES = "pretrain_curves.png"
#: what a pretrain run leaves in its run dir (a second run into it is refused without overwrite)
OUTPUTS = (WEIGHTS_FILE, SIDECAR, CURVES)
METHODS = ("simclr",)
BN_MODES = ("frozen", "train")


# --------------------------------------------------------------------------- data


def find_images(root: Path) -> list[Path]:
    """Every image under ``root`` at any depth, sorted; hidden files and folders are skipped.

    Folder symlinks are followed but no folder is entered twice (no loops), and an image reached
    by two paths counts once (`tl_cli.data.inputs`, the finder tl predict uses).
    """
    from tl_cli.data.inputs import _unique_files, _walk
    from tl_cli.modalities.image.data import IMAGE_FILES

    def wanted(f: str) -> bool:
        rel = Path(f).relative_to(root).parts
        return not any(p.startswith(".") for p in rel) and IMAGE_FILES.matches(Path(f))

    return [Path(f) for f in _unique_files(sorted(f for f in _walk(str(root)) if wanted(f)))]


# --------------------------------------------------------------------------- the module


class StepProgress(pl.Callback):
    """A rich bar over the optimizer steps on a terminal; about ten plain lines elsewhere."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.every = max(1, total // 10)
        self._stack = contextlib.ExitStack()
        self._advance: Any = None
        self.interrupt: BaseException | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._advance = self._stack.enter_context(progress("pretraining", self.total, unit="step"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self._advance()
        step = trainer.global_step
        if not interactive() and (step % self.every == 0 or step == self.total):
            recent = pl_module.losses[-self.every :]
            say(f"step {step}/{self.total} loss {sum(recent) / max(1, len(recent)):.4f}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._stack.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        self.interrupt = exception
        self._stack.close()


# --------------------------------------------------------------------------- outputs


def loss_summary(losses: list[float], points: int = 200) -> dict[str, Any]:
    """First/last/min loss, means of the first and last tenth, and a curve of at most ``points``."""
    if not losses:
        return {}
    k = max(1, len(losses) // 10)
    stride = max(1, math.ceil(len(losses) / points))
    curve = [
        [i + 1, round(sum(losses[i : i + stride]) / len(losses[i : i + stride]), 5)]
        for i in range(0, len(losses), stride)
    ]
    return {
        "first": losses[0],
        "last": losses[-1],
        "min": min(losses),
        "first_tenth_mean": sum(losses[:k]) / k,
        "last_tenth_mean": sum(losses[-k:]) / k,
        "curve": curve,  # [step, mean loss over the stride]
    }


def plot_loss(losses: list[float], path: Path, title: str) -> None:
    from tl_cli.core.plots import figure as _figure
    from tl_cli.core.plots import save_figure as _save

    fig = _figure(7, 4)
    ax = fig.subplots()
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, color="0.75", lw=0.8, label="per step")
    k = max(1, len(losses) // 20)
    if len(losses) > k:
        smooth = [
            sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(steps, smooth, color="C0", lw=2, label=f"mean of {k} steps")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("NT-Xent loss")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


# --------------------------------------------------------------------------- init=RUN


# --------------------------------------------------------------------------- the command


def _settings(cfg: DictConfig) -> tuple[dict[str, Any], int, int]:
    p = dict(plain(cfg.pretrain))
    if p.get("method") not in METHODS:
        raise TLError(f"pretrain.method={p.get('method')!r} must be one of {', '.join(METHODS)}")
    if p.get("bn") not in BN_MODES:
        raise TLError(f"pretrain.bn={p.get('bn')!r} must be one of {', '.join(BN_MODES)}")
    for key in ("lr", "temperature", "head_lr_mult"):
        v = p.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
            raise TLError(f"pretrain.{key}={v!r} must be a positive number")
    if not 0 < float(p["min_scale"]) <= 1:
        raise TLError(f"pretrain.min_scale={p['min_scale']!r} must be in (0, 1]")
    steps = cfg.trainer.get("max_steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise TLError(f"trainer.max_steps={steps!r} must be a positive integer (pretraining steps)")
    epochs = cfg.trainer.get("max_epochs")
    if epochs not in (-1, None) and (
        isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1
    ):
        raise TLError(
            f"trainer.max_epochs={epochs!r} must be a positive integer (or -1: trainer.max_steps counts)"
        )
    bs = cfg.dataset.get("batch_size")
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 2:
        raise TLError(f"dataset.batch_size={bs!r} must be an integer >= 2 (contrastive pairs)")
    from tl_cli.core.values import check_image_size

    check_image_size(cfg.dataset.get("image_size"))  # as tl train: before any image is read
    try:
        int(cfg.seed)
    except (TypeError, ValueError):
        raise TLError(f"seed={cfg.seed!r} must be an integer") from None
    return p, steps, bs


def _images(cfg: DictConfig) -> tuple[Path, list[Path], int]:
    from omegaconf import OmegaConf

    from tl_cli.data.scan import IMAGE_FORMATS_HINT, drop_corrupt

    root_s = None if OmegaConf.is_missing(cfg.dataset, "root") else cfg.dataset.get("root")
    if not root_s:
        raise TLError("dataset.root is required: tl pretrain dataset.root=DIR (unlabelled images)")
    root = Path(os.path.expanduser(str(root_s)))
    if not root.is_dir():
        raise TLError(f"dataset.root={root_s}: not a folder")
    paths = find_images(root)
    if not paths:
        raise TLError(
            f"dataset.root={root_s}: no images ({IMAGE_FORMATS_HINT}) in it or its subfolders"
        )
    kept, bad = drop_corrupt({"": paths}, root, bool(cfg.dataset.get("skip_corrupt")))
    return root, kept[""], len(bad)


def fit_warmups(p: dict[str, Any], steps: int) -> str | None:
    """Shrink the two warm-ups to half of a short run, so the backbone trains (its LR is 0 during
    ``head_warmup_steps``); returns the line that says so, or None when they fit already.

    A run of 20 steps with the default 50-step head warm-up would otherwise end with the
    backbone exactly as it started, its weights bit-identical to the pretrained ones.
    """
    head, warm = int(p["head_warmup_steps"]), int(p["warmup_steps"])
    if head < 0 or warm < 0:
        raise TLError("pretrain.head_warmup_steps and pretrain.warmup_steps must be >= 0")
    budget = steps // 2
    if head + warm <= budget:
        return None
    new_head = head * budget // (head + warm)
    new_warm = budget - new_head
    p["head_warmup_steps"], p["warmup_steps"] = new_head, new_warm
    return (
        f"pretrain.head_warmup_steps={head} + pretrain.warmup_steps={warm} do not fit "
        f"{steps} steps (the backbone would barely train): shortened to {new_head} + {new_warm}, "
        f"half of the run"
    )


def _modality_choice() -> str | None:
    """The ``modality`` option Hydra composed (None outside a Hydra run: tests compose directly)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get("modality")
    except Exception:  # noqa: BLE001 - no Hydra run: the backbone's modality is checked instead
        return None


def run(cfg: DictConfig) -> dict[str, Any]:
    """`tl pretrain`: check everything, fit SimCLR, write the backbone, the sidecar and the plot."""
    from tl_cli.data.base import default_num_workers
    from tl_cli.run.training import quiet_lightning

    quiet_lightning()
    out = Path(str(cfg.output_dir))
    overwrite = bool(cfg.get("overwrite", False))
    modality = _modality_choice()
    if modality not in (None, "image"):
        raise TLError(f"modality={modality}: tl pretrain supports images for now (modality=image)")
    found = earlier_outputs(out, OUTPUTS)
    if found and not overwrite:
        raise TLError(
            f"{found[0]} already exists: choose another hydra.run.dir, or pass overwrite=true to replace it"
        )
    for name in OUTPUTS:
        check_output(out / name, overwrite=overwrite, label=str(out / name))
    p, steps, bs = _settings(cfg)
    seed = int(cfg.seed)
    pl.seed_everything(seed, workers=True, verbose=False)

    root, paths, n_bad = _images(cfg)  # the data first: a bad root fails before any model load
    backbone = build_backbone(cfg.backbone, pretrained=True)
    modality = getattr(backbone, "modality", "image")
    if modality != "image":
        raise TLError(
            f"backbone {backbone.name} reads {modality}: tl pretrain supports image backbones for now"
        )
    if len(paths) < 2:
        raise TLError(
            f"dataset.root={root}: {len(paths)} image; contrastive pretraining needs >= 2"
        )
    bs_eff = min(bs, len(paths))
    prep = backbone.effective_preprocessing({"image_size": cfg.dataset.get("image_size")})
    epochs = cfg.trainer.get("max_epochs")
    if epochs not in (-1, None):  # tl pretrain counts steps: epochs become steps, said once
        per_epoch = max(1, len(paths) // bs_eff)  # drop_last: full batches only
        say(
            f"trainer.max_epochs={epochs}: {epochs} x {per_epoch} steps ({len(paths)} images at "
            f"batch {bs_eff}) = {epochs * per_epoch} pretraining steps (trainer.max_steps={steps} "
            "is not used; tl pretrain counts optimizer steps)"
        )
        steps = epochs * per_epoch
    shrunk = fit_warmups(p, steps)
    if shrunk:
        say(shrunk)
    say(
        f"[bold]data[/] {len(paths)} unlabelled images under {root} (labels and folder names unused), "
        f"{prep['input_size']} px, batch {bs_eff} x 2 views\n"
        f"[bold]model[/] {backbone.name} ({backbone.source}, {count_params(backbone) / 1e6:.1f}M params) "
        f"+ SimCLR projection head; {steps} steps, LR {p['lr']:g} (head x{p['head_lr_mult']:g}), "
        f"BN {p['bn']}"
    )
    if len(paths) < bs:
        warn(f"{len(paths)} images < dataset.batch_size={bs}: batches of {bs_eff}")

    workers = cfg.dataset.get("num_workers")
    workers = default_num_workers() if workers is None else int(workers)
    loader = torch.utils.data.DataLoader(
        TwoViews(paths, view_transform(prep, p)),
        batch_size=bs_eff,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    module = SimCLRModule(backbone, p, steps)
    trainer_cfg = dict(plain(cfg.trainer))
    trainer_cfg.pop("_target_", None)
    trainer_cfg.update(max_steps=steps, max_epochs=-1)
    trainer = pl.Trainer(
        **trainer_cfg,
        callbacks=[ticks := StepProgress(steps)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(out),
    )
    claim_run_dir(out, overwrite=overwrite)  # lock the run dir while this run writes
    start = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    t0 = time.time()
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    try:
        trainer.fit(module, loader)
    except (KeyboardInterrupt, SystemExit, SIGTERMException):
        # Lightning turns Ctrl-C into sys.exit(1) after its own teardown, and re-raises SIGTERM:
        # keep what was learnt
        if not trainer.interrupted:
            raise
    seconds = time.time() - t0
    # the steps that finished (an interrupt inside a step leaves its loss without its update)
    losses = module.losses[: trainer.global_step]
    if not losses or not all(math.isfinite(v) for v in losses):
        raise TLError(
            "pretraining loss became NaN/inf: lower pretrain.lr; nothing written", exit_code=1
        )
    changed = any(not torch.equal(v, start[k]) for k, v in backbone.state_dict().items())
    signal_name, code = (
        ("SIGTERM", 143) if isinstance(ticks.interrupt, SIGTERMException) else ("SIGINT", 130)
    )
    if trainer.interrupted and not changed:
        raise TLError(
            f"pretraining interrupted ({signal_name}) at step {len(losses)}/{steps}, before the "
            f"backbone had changed (its LR is 0 for the first {p['head_warmup_steps']} steps): "
            "nothing written",
            exit_code=code,
        )
    if not changed:
        raise TLError(
            f"the backbone did not change in {len(losses)} steps (its weights equal the "
            "pretrained ones): raise pretrain.lr or trainer.max_steps; nothing written",
            exit_code=1,
        )
    bcfg = dict(plain(cfg.backbone))
    meta = {
        "kind": "tl-pretrain",
        "backbone": {"name": backbone.name, "source": backbone.source, **bcfg},
        "method": p["method"],
        "settings": p,
        "data": {
            "root": str(root.resolve()),
            "images": len(paths),
            "skipped_corrupt": n_bad,
            "image_size": int(prep["input_size"]),
            "batch_size": bs_eff,
        },
        "preprocessing": plain(prep),
        "steps": len(losses),
        "planned_steps": steps,
        "interrupted": bool(trainer.interrupted),
        "epochs": trainer.current_epoch + (0 if trainer.is_last_batch else 1),
        "seed": seed,
        "fit_seconds": round(seconds, 1),
        "loss": loss_summary(losses),
        "weights": WEIGHTS_FILE,
    }
    if trainer.is_global_zero:
        save_backbone(
            backbone, out / WEIGHTS_FILE, {"tl_backbone": backbone.name, "tl_kind": "tl-pretrain"}
        )
        write_json(out / SIDECAR, meta)
        plot_loss(
            losses, out / CURVES, f"tl pretrain {backbone.name}: {len(paths)} images, {steps} steps"
        )
        release_run_dir(out)
        ls = meta["loss"]
        size = int(prep["input_size"])
        say(
            f"loss {ls['first_tenth_mean']:.4f} -> {ls['last_tenth_mean']:.4f} (first/last tenth of "
            f"{len(losses)} steps) in {seconds:.0f}s\n"
            f"weights: {out / WEIGHTS_FILE}\n"
            f"next: tl train init={out} dataset.root=LABELLED_DIR dataset.image_size={size}  "
            f"(or tl finetune init={out} ...; the size it was pretrained at)"
        )
    if trainer.interrupted:
        raise TLError(
            f"pretraining interrupted ({signal_name}) at step {len(losses)}/{steps}; kept the "
            f"backbone so far in {out / WEIGHTS_FILE} (pretrain.json says interrupted: true)",
            exit_code=code,
        )
    return meta

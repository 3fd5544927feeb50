#!/usr/bin/env python
"""How far do the first optimizer steps of `tl finetune` move an L-BFGS-fitted model? (issue 24)

    python scripts/bench_finetune_step.py catdog_grey 96
    python scripts/bench_finetune_step.py coil_2 96

Data (built under build/bench/finetune_step/): ``catdog_grey``: CIFAR-10 cat vs dog in grey, 40
train images per class; ``coil_2``: COIL-20 objects 3 and 6 (domain coil1), 20 per class; each
class's files shuffled with seed 0. tl carves 10% of train for val, as a run would.

The head is fitted by tl's L-BFGS probe on the backbone's features (efficientnet_lite0, eval
transform). Then one batch of 32 augmented train images takes 1 or 3 steps of an optimizer,
either on the head alone (on the batch's cached augmented features) or on the backbone alone
(BatchNorm in eval mode, as ``strategy.bn=frozen``), with the training loss (label smoothing 0.1).
Printed: the change of the features (L2) and of the logit margin on the train images. No
training run: under a minute of CPU per set.
"""

from __future__ import annotations

import copy
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _bench_util import ROOT
from hydra import compose, initialize_config_dir
from PIL import Image

from tl_cli.cli import config_dir
from tl_cli.data.features import extract
from tl_cli.run import training
from tl_cli.transfer.probe import fit_probe

SHARED = (ROOT.parent / "shared" / "data").resolve()
OUT = ROOT / "build" / "bench" / "finetune_step"


def build_set(name: str) -> Path:
    if name == "catdog_grey":
        cif = SHARED / "cifar10-subset" / "train"
        classes = {c: sorted((cif / c).glob("*.png")) for c in ("cat", "dog")}
        n_train, grey = 40, True
    elif name == "coil_2":
        coil = SHARED / "coil20-domains" / "coil1"
        classes = {c: sorted((coil / c).glob("*.png")) for c in ("obj03", "obj06")}
        n_train, grey = 20, False
    else:
        raise SystemExit(f"unknown set {name!r}: catdog_grey or coil_2")
    for cls, files in classes.items():
        random.Random(0).shuffle(files)
        d = OUT / name / "train" / cls
        d.mkdir(parents=True, exist_ok=True)
        for f in files[:n_train]:
            if not (d / f.name).exists():
                im = Image.open(f)
                (im.convert("L") if grey else im).save(d / f.name)
    return OUT / name


def main() -> None:
    name, size = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            config_name="finetune",
            overrides=[
                "dataset=imagefolder",
                f"dataset.root={build_set(name)}",
                f"dataset.image_size={size}",
                "dataset.num_workers=0",
            ],
        )
    module, dm = training.build(cfg)
    module.eval()
    cpu = torch.device("cpu")
    x, y = extract(module.backbone, dm.dataset("train", train_aug=False), dm, cpu, "train")
    xa, _ = extract(module.backbone, dm.dataset("train", train_aug=True), dm, cpu, "train aug")
    fit = fit_probe(x, y, 2)
    X, Xa, Y = torch.as_tensor(x), torch.as_tensor(xa), torch.as_tensor(y)
    lg = X @ fit.weight.T + fit.bias
    print(
        f"{name} at {size} px: features mean L1 norm {np.abs(x).sum(1).mean():.0f}, mean L2 norm "
        f"{np.linalg.norm(x, axis=1).mean():.1f}, dim {x.shape[1]}\nL-BFGS head: C={fit.C:.3g}, "
        f"train acc {fit.train_acc:.3f}, |W| {fit.weight.norm():.3f}; fitted logit margin "
        f"|z1-z0|: median {(lg[:, 1] - lg[:, 0]).abs().median():.3f}"
    )
    for opt_name, lr in (("adamw", 1e-3), ("adamw", 1e-4), ("sgd", 1e-2), ("sgd", 1e-3)):
        w = fit.weight.clone().requires_grad_(True)
        b = fit.bias.clone().requires_grad_(True)
        opt = (
            torch.optim.AdamW([w, b], lr=lr, weight_decay=0.01)
            if opt_name == "adamw"
            else torch.optim.SGD([w, b], lr=lr, momentum=0.9, nesterov=True)
        )
        idx = torch.randperm(len(Y), generator=torch.Generator().manual_seed(0))[:32]
        F.cross_entropy(Xa[idx] @ w.T + b, Y[idx], label_smoothing=0.1).backward()
        opt.step()
        with torch.no_grad():
            d = (X @ w.T + b) - lg
            acc = ((X @ w.T + b).argmax(1) == Y).float().mean()
        print(
            f"one {opt_name} step at lr {lr:g} on the head: median |logit change| "
            f"{(d[:, 1] - d[:, 0]).abs().median():.3f}, train acc after {acc:.3f}"
        )
    head = torch.nn.Linear(x.shape[1], 2)
    head.weight.data.copy_(fit.weight)
    head.bias.data.copy_(fit.bias)
    imgs = torch.stack([dm.dataset("train", train_aug=False)[i][0] for i in range(len(Y))])
    aug = torch.stack([dm.dataset("train", train_aug=True)[i][0] for i in idx.tolist()])
    for opt_name, lr, steps in (
        ("adamw", 1e-4, 1),
        ("adamw", 1e-4, 3),
        ("adamw", 1e-5, 3),
        ("sgd", 1e-3, 3),
    ):
        bb = copy.deepcopy(module.backbone)
        bb.eval()  # BatchNorm in eval mode (strategy.bn=frozen)
        params = list(bb.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = (
            torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
            if opt_name == "adamw"
            else torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
        )
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(head(bb(aug)), Y[idx], label_smoothing=0.1).backward()
            opt.step()
        with torch.no_grad():
            f2 = bb(imgs)
            lg2 = head(f2)
        d = lg2 - lg
        print(
            f"{steps} {opt_name} step(s) at lr {lr:g} on the backbone: feature change "
            f"{(f2 - X).norm(dim=1).median():.2f} (of {X.norm(dim=1).median():.1f}), median "
            f"|margin change| {(d[:, 1] - d[:, 0]).abs().median():.3f}, train acc "
            f"{(lg2.argmax(1) == Y).float().mean():.3f}"
        )


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""How far do the first optimizer steps of `tl finetune` move an L-BFGS-fitted model? (issue 24)

    python scripts/bench_finetune_step.py [--size 96] [--sets catdog_grey,coil_2]

On small two-class sets (CIFAR cat vs dog in grey, 40 train images per class; COIL-20 objects 3
and 6, 20 per class), the head is fitted by tl's L-BFGS probe on the backbone's features
(efficientnet_lite0, eval transform), then ONE batch of 32 augmented images takes 1 or 3 steps
of an optimizer, either on the head alone or on the backbone alone (BatchNorm in eval mode, as
`strategy.bn=frozen`). Printed: the change of the features (L2, against their norm) and of the
logit margin on the train images. No training run: a few seconds per set.
"""

from __future__ import annotations

import argparse
import copy
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


def build_set(name: str, out: Path) -> Path:
    root = out / name
    if name == "catdog_grey":
        src = {
            c: sorted((SHARED / "cifar10-subset" / "train" / c).glob("*.png"))[:40]
            for c in ("cat", "dog")
        }
    else:  # coil_2
        src = {
            c: sorted((SHARED / "coil20-domains" / "coil1" / c).glob("*.png"))[:20]
            for c in ("obj03", "obj06")
        }
    for c, files in src.items():
        d = root / "train" / c
        d.mkdir(parents=True, exist_ok=True)
        for f in files:
            if not (d / f.name).exists():
                Image.open(f).convert("L").save(d / f.name)
    return root


def measure(root: Path, size: int) -> None:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            config_name="finetune",
            overrides=[
                "dataset=imagefolder",
                f"dataset.root={root}",
                f"dataset.image_size={size}",
                "dataset.num_workers=0",
                "dataset.val_fraction=0.05",
            ],
        )
    module, dm = training.build(cfg)
    module.eval()
    cpu = torch.device("cpu")
    x, y = extract(module.backbone, dm.dataset("train", train_aug=False), dm, cpu, "train")
    fit = fit_probe(x, y, dm.num_classes)
    X, Y = torch.as_tensor(x), torch.as_tensor(y)
    head = torch.nn.Linear(x.shape[1], dm.num_classes)
    head.weight.data.copy_(fit.weight)
    head.bias.data.copy_(fit.bias)
    with torch.no_grad():
        lg = head(X)
    margin = lambda z: (z[:, 1] - z[:, 0]).abs().median().item()  # noqa: E731
    print(
        f"{root.name}: {len(Y)} train images at {size} px; features L1 {np.abs(x).sum(1).mean():.0f}, "
        f"L2 {X.norm(dim=1).median():.1f}; L-BFGS head C={fit.C:.3g}, train acc {fit.train_acc:.3f}, "
        f"|W| {fit.weight.norm():.2f}, median logit margin {margin(lg):.2f}"
    )
    idx = torch.randperm(len(Y), generator=torch.Generator().manual_seed(0))[:32]
    ds_aug = dm.dataset("train", train_aug=True)
    aug = torch.stack([ds_aug[i][0] for i in idx.tolist()])
    ds = dm.dataset("train", train_aug=False)
    imgs = torch.stack([ds[i][0] for i in range(len(Y))])
    cases = [
        ("head", "adamw", 1e-3, 1),
        ("head", "adamw", 1e-4, 1),
        ("head", "adamw", 1e-5, 1),
        ("backbone", "adamw", 1e-4, 1),
        ("backbone", "adamw", 1e-4, 3),
        ("backbone", "adamw", 1e-5, 1),
        ("backbone", "adamw", 1e-5, 3),
        ("backbone", "sgd", 1e-3, 3),
    ]
    for part, opt_name, lr, steps in cases:
        bb, hd = copy.deepcopy(module.backbone).eval(), copy.deepcopy(head)
        params = list((hd if part == "head" else bb).parameters())
        for p in [*bb.parameters(), *hd.parameters()]:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = (
            torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
            if opt_name == "adamw"
            else torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
        )
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(hd(bb(aug)), Y[idx], label_smoothing=0.1).backward()
            opt.step()
        with torch.no_grad():
            f2 = bb(imgs) if part == "backbone" else X
            lg2 = hd(f2)
        d = lg2 - lg
        print(
            f"  {steps} {opt_name} step(s) at lr {lr:g} on the {part}: feature change "
            f"{(f2 - X).norm(dim=1).median():.1f}, margin change {margin(d):.3f}, "
            f"train acc {(lg2.argmax(1) == Y).float().mean():.3f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--sets", default="catdog_grey,coil_2")
    ap.add_argument("--out", default=str(ROOT / "build" / "bench" / "finetune_step"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.sets.split(","):
        measure(build_set(name, Path(args.out)), args.size)


if __name__ == "__main__":
    main()

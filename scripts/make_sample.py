"""Build the built-in `sample` dataset from ../shared/data/cifar10-subset.

It copies a class-balanced slice (the first N files of each class, in name order, so the
result is reproducible) into tl_cli/sample_data/{train,test}/<class>/. The images are real
CIFAR-10 images (Krizhevsky, 2009); see tl_cli/sample_data/README.md.

    python scripts/make_sample.py --train-per-class 60 --test-per-class 20
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, default=ROOT.parent / "shared/data/cifar10-subset")
    p.add_argument("--dst", type=Path, default=ROOT / "tl_cli/sample_data")
    p.add_argument("--train-per-class", type=int, default=60)
    p.add_argument("--test-per-class", type=int, default=20)
    a = p.parse_args()
    for split, n in (("train", a.train_per_class), ("test", a.test_per_class)):
        for cls_dir in sorted((a.src / split).iterdir()):
            out = a.dst / split / cls_dir.name
            if out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True)
            for f in sorted(cls_dir.glob("*.png"))[:n]:
                shutil.copy2(f, out / f.name)
    print(f"wrote {sum(1 for _ in a.dst.rglob('*.png'))} images under {a.dst}")


if __name__ == "__main__":
    main()

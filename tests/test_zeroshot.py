"""Zero-shot: class-name normalisation, the ConSE head, tl zeroshot checkpoints (images, text)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tl_cli.commands import evaluate, export, predict, zeroshot
from tl_cli.core.errors import TLError
from tl_cli.tasks.loading import load_module
from tl_cli.transfer.zeroshot import ConSEHead, class_descriptions, describe_class

from .conftest import TINY_FEATURES, run_cfg, run_tl


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("ants", "ant"),
        ("golden_retriever", "golden retriever"),
        ("cell phone", "cell phone"),
        ("Cars", "car"),
        ("butterflies", "butterfly"),
        ("boxes", "box"),
        ("watches", "watch"),
        ("glasses", "glasses"),
        ("bus", "bus"),
        ("Golden-Retrievers", "golden retriever"),
        ("GoldenRetriever", "golden retriever"),
        ("001.ak47", "ak47"),
        ("012.binoculars", "binoculars"),
        ("people", "person"),
        ("leaves", "leaf"),
        ("tomatoes", "tomato"),
        ("fish", "fish"),
        ("cat", "cat"),
        ("airplane", "airplane"),
    ],
)
def test_describe_class(raw, want):
    assert describe_class(raw) == want


def test_class_descriptions_override():
    names = ["cat", "dog_breeds"]
    assert class_descriptions(names, None) == ["cat", "dog breed"]
    assert class_descriptions(names, ["kitten", "puppy"]) == ["kitten", "puppy"]
    assert class_descriptions(names, {"dog_breeds": "a dog"}) == ["cat", "a dog"]
    with pytest.raises(TLError, match="classes lists 1 names but the data has 2 classes"):
        class_descriptions(names, ["kitten"])
    with pytest.raises(TLError, match="'cow' is not a class of the data"):
        class_descriptions(names, {"cow": "a cow"})


def _conse(top_t: int) -> ConSEHead:
    """6 source classes: 0-2 mean 'x', 3-5 mean 'y'; class 0 is 'x', class 1 is 'y'."""
    head = ConSEHead(in_features=6, num_classes=2, num_source=6, text_dim=2, top_t=top_t)
    with torch.no_grad():
        head.source.weight.copy_(torch.eye(6))
        head.source.bias.zero_()
        head.source_emb.copy_(torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3))
        head.classes.weight.copy_(torch.eye(2))
    return head


def test_conse_head_known_answer_top_t_and_dense():
    # one confident source: its meaning wins, with any T
    f = torch.tensor([[9.0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 9.0, 0]])
    for t in (0, 1, 3):
        assert _conse(t)(f).argmax(1).tolist() == [0, 1]
    # source 0 is the single most probable ('x'), but 'y' holds most of the mass:
    # top-1 picks 'x', the dense (all sources) and top-4 mixtures pick 'y'
    p = torch.tensor([[0.31, 0.0, 0.0, 0.23, 0.23, 0.23]])
    logits_in = torch.log(p + 1e-9)
    assert _conse(1)(logits_in).argmax(1).item() == 0
    assert _conse(0)(logits_in).argmax(1).item() == 1
    assert _conse(4)(logits_in).argmax(1).item() == 1
    # scores are scaled cosines
    out = _conse(0)(logits_in) / _conse(0).scale
    assert out.abs().max() <= 1.0 + 1e-6


class StubEncoder:
    """A deterministic fake text encoder: a seeded random unit vector per string."""

    def __init__(self, *a, **k) -> None:
        pass

    def embed_templated(self, names, templates):
        out = []
        for n in names:
            seed = int(hashlib.sha256(n.encode()).hexdigest()[:8], 16)
            out.append(torch.randn(16, generator=torch.Generator().manual_seed(seed)))
        return F.normalize(torch.stack(out), dim=-1)


@pytest.fixture
def stub_conse(monkeypatch):
    """ConSE without the bundled weights: a random 'ImageNet classifier' for the tiny backbone."""
    g = torch.Generator().manual_seed(0)
    monkeypatch.setattr(
        zeroshot,
        "imagenet_classifier",
        lambda cfg: (torch.randn(1000, 256, generator=g), torch.zeros(1000)),
    )
    monkeypatch.setattr(zeroshot, "TextEncoder", StubEncoder)


def test_image_zeroshot_checkpoint_is_ordinary(stub_conse, tiny_data, tmp_path):
    out = tmp_path / "zs"
    res = zeroshot.run(run_cfg([*TINY_FEATURES, f"dataset.root={tiny_data}"], out, "zeroshot"))
    ckpt = out / "checkpoints" / "zeroshot.ckpt"
    module, meta = load_module(ckpt)
    assert meta["hyper_parameters"]["head"]["name"] == "conse"
    assert module.class_names == ["cat", "dog", "fox"]
    # scored at once on the test split, with tl eval's schema
    saved = json.loads((out / "eval.json").read_text())
    assert saved["split"] == "test" and saved["num_samples"] == 12 and res["acc"] == saved["acc"]
    ev = evaluate.run(
        run_cfg([f"checkpoint={ckpt}", f"dataset.root={tiny_data}"], tmp_path / "ev", "eval")
    )
    assert set(saved) - {"descriptions"} == set(ev) and ev["acc"] == saved["acc"]
    preds = tmp_path / "p.csv"
    predict.run(
        run_cfg(
            [f"checkpoint={ckpt}", f"inputs={tiny_data / 'test'}", f"output={preds}"],
            tmp_path / "pr",
            "predict",
        )
    )
    assert len(preds.read_text().splitlines()) == 13
    pytest.importorskip("onnxruntime")
    r = export.run(
        run_cfg(
            [f"checkpoint={ckpt}", "format=onnx", f"output={tmp_path / 'm.onnx'}"],
            tmp_path / "ex",
            "export",
        )
    )
    assert r["passed"] is True  # top-T (torch.topk) exports and matches PyTorch


def test_zeroshot_skips_a_truncated_jpeg_when_asked_also_when_scoring(stub_conse, tmp_path):
    """Issue 29: dataset.skip_corrupt=true skipped the file while building, then the scoring step
    (an eval config without the option) failed on it: every re-read carries the data options."""
    import shutil

    from .conftest import make_image_folder

    root = make_image_folder(tmp_path / "data", {"": 4})
    good = root / "cat" / "cat_000.png"
    from PIL import Image

    Image.open(good).convert("RGB").save(root / "cat" / "whole.jpg", quality=90)
    data = (root / "cat" / "whole.jpg").read_bytes()
    (root / "cat" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    shutil.copy(good, root / "dog" / "extra.png")
    with pytest.raises(TLError, match="truncated.jpg.*dataset.skip_corrupt=true"):
        zeroshot.run(run_cfg([*TINY_FEATURES, f"dataset.root={root}"], tmp_path / "z1", "zeroshot"))
    res = zeroshot.run(
        run_cfg(
            [*TINY_FEATURES, f"dataset.root={root}", "dataset.skip_corrupt=true"],
            tmp_path / "z2",
            "zeroshot",
        )
    )
    # 4 + 1 + 4 + 1 + 4 readable images, the truncated one skipped in the scoring too
    assert res["num_samples"] == 14 and (tmp_path / "z2" / "eval.json").is_file()


def test_zeroshot_from_class_names_alone(stub_conse, tmp_path):
    out = tmp_path / "zs"
    zeroshot.run(run_cfg([*TINY_FEATURES, "classes=[Cats,golden_retriever]"], out, "zeroshot"))
    module, _ = load_module(out / "checkpoints" / "zeroshot.ckpt")
    assert module.class_names == ["Cats", "golden_retriever"]
    assert not (out / "eval.json").exists()  # nothing labelled to score


def test_zeroshot_refuses_an_existing_checkpoint_and_bad_input(stub_conse, tiny_data, tmp_path):
    out = tmp_path / "zs"
    zeroshot.run(run_cfg([*TINY_FEATURES, "classes=[a,b]"], out, "zeroshot"))
    with pytest.raises(TLError, match="zeroshot.ckpt already exists"):
        zeroshot.run(run_cfg([*TINY_FEATURES, "classes=[a,b]"], out, "zeroshot"))
    with pytest.raises(TLError, match="needs class names"):
        zeroshot.run(run_cfg(TINY_FEATURES, tmp_path / "z2", "zeroshot"))
    with pytest.raises(TLError, match="classes lists 2 names but the data has 3"):
        zeroshot.run(
            run_cfg(
                [*TINY_FEATURES, f"dataset.root={tiny_data}", "classes=[a,b]"],
                tmp_path / "z3",
                "zeroshot",
            )
        )


def test_zeroshot_cli_error_exit_2_one_line(tmp_path):
    r = run_tl("zeroshot", "backbone=resnet18", "classes=[a,b]", f"hydra.run.dir={tmp_path / 'r'}")
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    # one line naming the backbone at fault and the ones that ship an ImageNet classifier
    assert len(lines) == 1 and "backbone=resnet18" in lines[0], lines
    assert "efficientnet_lite0" in lines[0] and "Traceback" not in r.stderr


@pytest.mark.slow
def test_text_zeroshot_real_minilm_obvious_sentences(tmp_path):
    """The real MiniLM: obvious sentiment sentences, labels 'positive'/'negative' only."""
    pos = [
        "I love it, it is wonderful and works great.",
        "Excellent product, very happy with it.",
        "Great quality, highly recommended.",
        "Fantastic, the best purchase I have made.",
    ]
    neg = [
        "I hate this, it is horrible.",
        "Very bad, very disappointing.",
        "Bad, I hate it.",
        "Horrible and useless.",
    ]
    csv = tmp_path / "s.csv"
    csv.write_text(
        "text,label\n"
        + "".join(f'"{t}",positive\n' for t in pos)
        + "".join(f'"{t}",negative\n' for t in neg)
    )
    out = tmp_path / "zs"
    res = zeroshot.run(
        run_cfg(["modality=text", f"dataset.root={csv}", "device=cpu"], out, "zeroshot")
    )
    assert res["split"] == "all" and res["num_samples"] == 8
    assert res["acc"] == 1.0, res["confusion_matrix"]
    module, meta = load_module(out / "checkpoints" / "zeroshot.ckpt")
    assert meta["tl"]["modality"] == "text" and module.class_names == ["negative", "positive"]
    head = module.head  # the prototype head: unit-norm label embeddings, no centring
    assert torch.allclose(head.linear.weight.norm(dim=1), torch.ones(2), atol=1e-5)
    assert float(head.center.abs().max()) == 0.0


@pytest.mark.slow
def test_image_zeroshot_real_conse_on_the_sample(tmp_path):
    """The bundled lite0 + MiniLM on 5 built-in sample images per class (CIFAR, 32 px): well
    above chance (0.1) from the folder names alone."""
    from tl_cli.modalities.image.data import sample_root

    root = tmp_path / "cifar"
    for d in sorted((Path(sample_root()) / "test").iterdir()):
        (root / d.name).mkdir(parents=True)
        for f in sorted(d.glob("*.png"))[:5]:
            shutil.copy(f, root / d.name / f.name)
    out = tmp_path / "zs"
    res = zeroshot.run(
        run_cfg(
            [
                f"dataset.root={root}",
                "dataset.image_size=128",
                "dataset.num_workers=0",
                "device=cpu",
            ],
            out,
            "zeroshot",
        )
    )
    assert res["num_samples"] == 50 and res["acc"] >= 0.3, res["per_class"]

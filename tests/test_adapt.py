"""Domain adaptation (issue 14): dataset.target_root + adapt=none|adabn|dann|self_training.

Gradient reversal and its schedule, AdaBN touching only BatchNorm statistics, target labels never
reaching training (scrambled labels -> bit-identical training), domains.png, target/acc in
metrics.json, the DANN checkpoint loading and scoring the target with `tl eval`, one-line errors.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from PIL import Image

from tests.conftest import COLORS, TINY, compose_cfg, make_image_folder, run_tl
from tests.test_audio import clip, make_audio_folder
from tests.test_text import (
    make_texts,
    tiny_bert,  # noqa: F401 - the session fixture, used by name
    tiny_text,
    write_csv,
    write_jsonl,
)
from tl_cli.commands import evaluate, train
from tl_cli.core.errors import TLError
from tl_cli.run import training
from tl_cli.tasks.loading import load_module
from tl_cli.transfer import adapt

SHARED_COIL = Path(__file__).resolve().parents[2] / "shared" / "data" / "coil20-domains"


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shifted target domain: the same three classes, other noise (class folders = labels)."""
    return make_image_folder(tmp_path_factory.mktemp("target"), {"": 6}, seed=7)


def cfg_for(source: Path, target: Path | None, out: Path, *extra: str):
    over = [*TINY, f"dataset.root={source}", *extra]
    if target is not None:
        over.append(f"dataset.target_root={target}")
    cfg = compose_cfg(over)
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


# --------------------------------------------------------------------------- gradient reversal


def test_gradient_reversal_is_identity_forward_and_negated_scaled_backward() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    y = adapt.grad_reverse(x, 0.3)
    assert torch.equal(y, x)
    g = torch.randn(4, 3)
    y.backward(g)
    assert torch.allclose(x.grad, -0.3 * g)


def test_dann_coefficient_ramps_from_zero_to_one() -> None:
    ps = np.linspace(0, 1, 11)
    c = [adapt.dann_coefficient(p) for p in ps]
    assert c[0] == 0.0
    assert all(b > a for a, b in zip(c, c[1:], strict=False))
    assert c[5] == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert c[-1] == pytest.approx(2 / (1 + math.exp(-10)) - 1) and c[-1] > 0.999
    assert adapt.dann_coefficient(2.0) == c[-1]  # clamped past the end


# --------------------------------------------------------------------------- AdaBN


def test_adabn_changes_only_batchnorm_statistics(tiny_data: Path, target_dir: Path) -> None:
    cfg = cfg_for(tiny_data, target_dir, Path("unused"), "adapt=adabn", "adapt.layers=all")
    module, dm = training.build(cfg)
    feats = np.random.default_rng(0).normal(size=(10, module.backbone.num_features))
    module.head[0].set_statistics(feats)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    bn_keys = {
        f"{name}.{b}"
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        for b, _ in m.named_buffers(recurse=False)
    }
    params = {n for n, _ in module.named_parameters()}
    out = module.adapter.after_fit(module.eval(), dm, torch.device("cpu"), feats)
    assert out is not None and out.shape == (len(dm.splits["target"]), feats.shape[1])
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "AdaBN changed nothing"
    assert changed <= bn_keys, f"AdaBN changed more than BN statistics: {sorted(changed - bn_keys)}"
    assert not changed & params
    # the backbone's BN layers and the head's feature norm both took the target's statistics
    assert any(k.startswith("backbone.") for k in changed)
    assert any(k.startswith("head.0.") for k in changed)


# --------------------------------------------------------------------------- target labels


def _scramble(monkeypatch) -> None:
    real = adapt.scan_target

    def scrambled(dcfg, dm):
        items, labelled = real(dcfg, dm)
        labels = [y for _, y in items]
        rng = random.Random(123)
        new = labels[:]
        while new == labels:
            rng.shuffle(new)
        return [(x, y) for (x, _), y in zip(items, new, strict=True)], labelled

    monkeypatch.setattr(adapt, "scan_target", scrambled)


@pytest.mark.parametrize(
    "method,head_fit", [("dann", "sgd"), ("self_training", "sgd"), ("self_training", "lbfgs")]
)
def test_target_labels_never_reach_training(
    tiny_data: Path, target_dir: Path, tmp_path: Path, monkeypatch, method: str, head_fit: str
) -> None:
    extra = [f"adapt={method}", f"strategy.head_fit={head_fit}"]
    if method == "dann":
        extra += ["adapt.bottleneck=16", "adapt.hidden=32"]  # small: the test is about the data
    m1 = train.run(cfg_for(tiny_data, target_dir, tmp_path / "a", *extra))
    _scramble(monkeypatch)
    m2 = train.run(cfg_for(tiny_data, target_dir, tmp_path / "b", *extra))
    # the same training: loss curve and weights bit for bit
    losses1 = [r["train/loss"] for r in m1["history"]]
    losses2 = [r["train/loss"] for r in m2["history"]]
    assert losses1 == losses2
    sd1 = torch.load(tmp_path / "a/checkpoints/best.ckpt", weights_only=True)["state_dict"]
    sd2 = torch.load(tmp_path / "b/checkpoints/best.ckpt", weights_only=True)["state_dict"]
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    if head_fit == "sgd":
        assert m1["defaults"]["optimizer_steps"] > 0  # it trained
    else:  # L-BFGS refits on source + pseudo-labels
        assert m1["defaults"]["head_fit"]["self_training_rounds"] == 3
    # ... and the scramble was real: only the scoring of the target saw it
    assert "target/acc" in m1 and "target/acc" in m2


def test_dann_run_writes_plot_metrics_and_an_ordinary_checkpoint(
    tiny_data: Path, target_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "dann"
    m = train.run(
        cfg_for(tiny_data, target_dir, out, "adapt=dann", "adapt.bottleneck=16", "adapt.hidden=32")
    )
    for key in ("source/val/acc", "target/acc", "target/macro_f1", "target/entropy"):
        assert key in m, key
    assert m["adapt"] == "dann" and m["target_labelled"] is True
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["target/acc"] == m["target/acc"]
    assert "val/acc" in saved and "test/acc" in saved  # the usual keys are still there
    png = out / "domains.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert m["best_epoch"] == m["epochs"]  # the adapted (last) epoch, not the earliest
    # an ordinary classification checkpoint: the bottleneck is the head, no discriminator
    ckpt = out / "checkpoints" / "best.ckpt"
    module, raw = load_module(ckpt)
    assert raw["hyper_parameters"]["head"]["name"] == "bottleneck"
    assert not any("discriminator" in k for k in raw["state_dict"])
    # tl eval on the target folder reproduces target/acc
    ecfg = compose_cfg([f"checkpoint={ckpt}", f"dataset.root={target_dir}"], config_name="eval")
    with open_dict(ecfg):
        ecfg.output_dir = str(tmp_path / "eval")
    res = evaluate.run(ecfg)
    assert res["acc"] == pytest.approx(m["target/acc"], abs=1e-6)


def test_unlabelled_flat_target_reports_no_accuracy(tiny_data: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    rng = np.random.default_rng(3)
    for i, rgb in enumerate(COLORS.values()):
        for j in range(3):
            arr = np.clip(np.array(rgb)[None, None] + rng.normal(0, 30, (24, 24, 3)), 0, 255)
            Image.fromarray(arr.astype("uint8")).save(flat / f"img_{i}_{j}.png")
    out = tmp_path / "run"
    m = train.run(cfg_for(tiny_data, flat, out, "trainer.max_epochs=1"))
    assert m["target_labelled"] is False and m["target_size"] == 9
    assert "target/acc" not in m and "target/entropy" in m and "source/val/acc" in m
    assert (out / "domains.png").exists()


# --------------------------------------------------------------------------- errors


def _setup_error(tiny_data: Path, target: Path | None, *extra: str) -> str:
    from tl_cli.data.base import DATASETS

    cfg = cfg_for(tiny_data, target, Path("unused"), *extra)
    dm = DATASETS.build(cfg.dataset)
    dm.prepare()
    with pytest.raises(TLError) as e:
        adapt.setup(cfg, dm)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_clear_errors(tiny_data: Path, tmp_path: Path) -> None:
    assert "does not exist" in _setup_error(tiny_data, tmp_path / "nope")
    assert "dataset.target_root" in _setup_error(tiny_data, None, "adapt=dann")
    other = make_image_folder(tmp_path / "other", {"": 2})
    os.rename(other / "cat", other / "lion")
    msg = _setup_error(tiny_data, other)
    assert "lion" in msg and "not classes of the source" in msg
    with pytest.raises(TLError, match="adapt.bogus is not an option"):
        adapt.ADAPTERS.build({"name": "dann", "bogus": 1})


def test_unknown_adapt_is_one_line(tmp_path: Path) -> None:
    r = run_tl("train", "adapt=bogus", f"output_dir={tmp_path}")
    assert r.returncode == 2
    err = r.stderr.strip()
    assert "adapt" in err and "bogus" in err and "Traceback" not in err


# --------------------------------------------------------------------------- real data


def shared_coil() -> Path:
    if SHARED_COIL.is_dir():
        return SHARED_COIL
    if os.environ.get("TL_REQUIRE_SHARED") == "1":
        pytest.fail(f"TL_REQUIRE_SHARED=1 but {SHARED_COIL} is missing")
    pytest.skip(f"{SHARED_COIL} not present")


@pytest.mark.slow
def test_adabn_on_a_coil_slice_scores_the_target_like_tl_eval(tmp_path: Path) -> None:
    """Real weights: COIL1 -> COIL2 on 5 objects; AdaBN's checkpoint reproduces target/acc."""
    src = shared_coil()
    for dom in ("coil1", "coil2"):
        for obj in sorted((src / dom).iterdir())[:5]:
            shutil.copytree(obj, tmp_path / dom / obj.name)
    out = tmp_path / "run"
    cfg = compose_cfg(
        [
            "dataset=imagefolder",
            f"dataset.root={tmp_path / 'coil1'}",
            f"dataset.target_root={tmp_path / 'coil2'}",
            "dataset.image_size=32",
            "dataset.num_workers=0",
            "trainer.max_epochs=1",
            "adapt=adabn",
        ]
    )
    with open_dict(cfg):
        cfg.output_dir = str(out)
    m = train.run(cfg)
    assert m["target/acc"] > 0.5  # 5 classes: chance is 0.2
    ecfg = compose_cfg(
        [f"checkpoint={out / 'checkpoints/best.ckpt'}", f"dataset.root={tmp_path / 'coil2'}"],
        config_name="eval",
    )
    with open_dict(ecfg):
        ecfg.output_dir = str(tmp_path / "eval")
    assert evaluate.run(ecfg)["acc"] == pytest.approx(m["target/acc"], abs=1e-6)


def test_domains_plot_has_readable_markers_and_a_class_legend():
    """Issue 29: domains.png markers were tiny and nothing said which marker is which class."""
    from tl_cli.transfer.domains import domains_figure

    rng = np.random.default_rng(0)
    src, tgt = rng.normal(size=(30, 8)), rng.normal(size=(20, 8)) + 1
    ys, yt = np.arange(30) % 3, np.r_[np.arange(15) % 3, -np.ones(5, dtype=int)]
    fig = domains_figure((src, tgt), None, ys, yt, "adapt=none", class_names=["cat", "dog", "fox"])
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["source", "target", "unlabelled target", "cat", "dog", "fox"]
    sizes = [float(c.get_sizes()[0]) for c in fig.axes[0].collections]
    assert min(sizes) >= 20  # points^2; it was 12


# --------------------------------------------------------------------------- text and audio (issue 28)


@pytest.fixture
def bert(request: pytest.FixtureRequest) -> Path:
    """test_text's tiny random BERT directory (one per session)."""
    return request.getfixturevalue("tiny_bert")


def _same_training(m1: dict, m2: dict, a: Path, b: Path) -> None:
    """Loss curves and saved weights bit for bit; the target was scored both times."""
    assert [r["train/loss"] for r in m1["history"]] == [r["train/loss"] for r in m2["history"]]
    sd1 = torch.load(a / "checkpoints/best.ckpt", weights_only=True)["state_dict"]
    sd2 = torch.load(b / "checkpoints/best.ckpt", weights_only=True)["state_dict"]
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert m1["defaults"]["optimizer_steps"] > 0
    assert "target/acc" in m1 and "target/acc" in m2


def text_adapt_cfg(bert: Path, source: Path, target: Path, out: Path, *extra: str):
    cfg = compose_cfg(
        [*tiny_text(bert, *extra), f"dataset.root={source}", f"dataset.target_root={target}"]
    )
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


@pytest.fixture(scope="module")
def text_domains(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("textdom")
    return write_csv(d / "source.csv", make_texts(30)), write_csv(
        d / "target.csv", make_texts(8, 5)
    )


@pytest.mark.parametrize(
    "method", ["dann", "self_training", "dsn", "self_training+finetune", "dsn+finetune"]
)
def test_text_target_labels_never_reach_training(
    bert: Path, text_domains, tmp_path: Path, monkeypatch, method: str
) -> None:
    """As for images: scrambled target labels train bit for bit the same (cached features and a
    transformer that trains)."""
    source, target = text_domains
    name, _, strategy = method.partition("+")
    extra = [f"adapt={name}", "strategy.head_fit=sgd"]
    if name in ("dann", "dsn"):
        extra += ["adapt.bottleneck=16", "adapt.hidden=32"]
    if strategy:
        extra += [f"strategy={strategy}", "trainer.max_epochs=1"]
    m1 = train.run(text_adapt_cfg(bert, source, target, tmp_path / "a", *extra))
    _scramble(monkeypatch)
    m2 = train.run(text_adapt_cfg(bert, source, target, tmp_path / "b", *extra))
    _same_training(m1, m2, tmp_path / "a", tmp_path / "b")
    assert m1["target_size"] == 16 and m1["target_labelled"] is True


def test_text_target_readers(bert: Path, tmp_path: Path) -> None:
    """A table with labels scores the target; a table without a label column, a .txt file (one
    text per line) or a flat folder of .txt documents is unlabelled; class folders label it."""
    import tl_cli.tasks.components  # noqa: F401
    from tl_cli.data.base import DATASETS

    source = write_csv(tmp_path / "source.csv", make_texts(10))
    dm = DATASETS.build({"name": "text", "root": str(source)}).prepare()
    rows = make_texts(3, 9)

    def scan(target: Path) -> tuple[list, bool]:
        return adapt.scan_target({"target_root": str(target)}, dm)

    items, labelled = scan(write_jsonl(tmp_path / "t.jsonl", rows))
    assert labelled and [y for _, y in items] == [dm.class_names.index(r[1]) for r in rows]
    assert [i.text for i, _ in items] == [r[0] for r in rows]
    items, labelled = scan(write_csv(tmp_path / "u.csv", [(r[0],) for r in rows], header=("text",)))
    assert not labelled and [y for _, y in items] == [-1] * 6
    lines = tmp_path / "u.txt"
    lines.write_text("a phone\n\nthe battery is great\n")
    items, labelled = scan(lines)
    assert not labelled and [i.text for i, _ in items] == ["a phone", "the battery is great"]
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, (text, _) in enumerate(rows):
        (flat / f"{i}.txt").write_text(text + "\nsame document\n")
    items, labelled = scan(flat)
    assert not labelled and len(items) == 6 and all("\n" in i.text for i, _ in items)
    folders = tmp_path / "folders"
    for i, (text, label) in enumerate(rows):
        (folders / label).mkdir(parents=True, exist_ok=True)
        (folders / label / f"{i}.txt").write_text(text)
    items, labelled = scan(folders)
    assert labelled and sorted(y for _, y in items) == [0, 0, 0, 1, 1, 1]
    bad = write_csv(tmp_path / "bad.csv", [("fine", "neutral"), ("ok", "positive")])
    with pytest.raises(TLError, match="neutral are not classes of the source"):
        scan(bad)
    with pytest.raises(TLError, match="target_root.*no .csv"):
        (tmp_path / "empty").mkdir()
        scan(tmp_path / "empty")


def test_text_unlabelled_target_trains_and_reports_no_accuracy(bert: Path, tmp_path: Path) -> None:
    source = write_csv(tmp_path / "source.csv", make_texts(20))
    target = tmp_path / "target.txt"
    target.write_text("\n".join(t for t, _ in make_texts(5, 3)) + "\n")
    out = tmp_path / "run"
    m = train.run(
        text_adapt_cfg(bert, source, target, out, "adapt=self_training", "strategy.head_fit=sgd")
    )
    assert m["target_labelled"] is False and m["target_size"] == 10
    assert "target/acc" not in m and "target/entropy" in m and (out / "domains.png").exists()


def test_adabn_of_backbone_batchnorm_on_a_transformer_is_one_line(
    bert: Path, text_domains, tmp_path: Path
) -> None:
    source, target = text_domains
    cfg = text_adapt_cfg(bert, source, target, tmp_path, "adapt=adabn", "adapt.layers=all")
    with pytest.raises(TLError) as e:
        training.build(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "no BatchNorm" in msg and "adapt.layers=head" in msg
    # the default (the head's feature statistics) applies to any backbone
    m = train.run(text_adapt_cfg(bert, source, target, tmp_path / "ok", "adapt=adabn"))
    assert "target/acc" in m


@pytest.fixture(scope="module")
def audio_domains(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("audiodom")
    return make_audio_folder(d / "source", {"": 6}), make_audio_folder(d / "target", {"": 3}, 4)


def audio_adapt_cfg(source: Path, target: Path, out: Path, *extra: str):
    cfg = compose_cfg(
        [
            "modality=audio",
            f"dataset.root={source}",
            f"dataset.target_root={target}",
            "dataset.num_workers=0",
            "dataset.batch_size=8",
            "trainer.accelerator=cpu",
            "trainer.max_epochs=2",
            "strategy.head_fit=sgd",
            *extra,
        ]
    )
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


@pytest.mark.parametrize("method", ["dann", "dsn"])
def test_audio_target_labels_never_reach_training(
    audio_domains, tmp_path: Path, monkeypatch, method: str
) -> None:
    source, target = audio_domains
    extra = [f"adapt={method}", "adapt.bottleneck=16", "adapt.hidden=32"]
    m1 = train.run(audio_adapt_cfg(source, target, tmp_path / "a", *extra))
    _scramble(monkeypatch)
    m2 = train.run(audio_adapt_cfg(source, target, tmp_path / "b", *extra))
    _same_training(m1, m2, tmp_path / "a", tmp_path / "b")
    assert m1["target_size"] == 9


def test_audio_targets_by_folder_flat_and_file_name(tmp_path: Path) -> None:
    """Class folders label the target; a flat folder does not (and its clips are checked like the
    source's); with label_from=regex the file names label it, or nothing does."""
    import soundfile as sf

    import tl_cli.tasks.components  # noqa: F401
    from tl_cli.data.base import DATASETS

    source = make_audio_folder(tmp_path / "source", {"": 2})
    dm = DATASETS.build({"name": "audiofolder", "root": str(source)}).prepare()
    items, labelled = adapt.scan_target({"target_root": str(source)}, dm)
    assert labelled and len(items) == 6
    flat = tmp_path / "flat"
    flat.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        sf.write(flat / f"clip{i}.wav", clip(300.0, 8000, 0.4, rng), 8000)
    items, labelled = adapt.scan_target({"target_root": str(flat)}, dm)
    assert not labelled and len(items) == 3
    (flat / "broken.wav").write_text("not audio")
    with pytest.raises(TLError, match="broken.wav"):
        adapt.scan_target({"target_root": str(flat)}, dm)

    spk = tmp_path / "speakers"
    for digit in ("0", "1"):
        (spk / digit).mkdir(parents=True)
        for who in ("ann", "bob"):
            sf.write(spk / digit / f"{digit}_{who}_0.wav", clip(300.0, 8000, 0.4, rng), 8000)
    rdm = DATASETS.build(
        {
            "name": "audiofolder",
            "root": str(spk),
            "label_from": "regex",
            "label_regex": r"^\d+_([a-z]+)_",
            "val_fraction": 0.5,
        }
    ).prepare()
    new = tmp_path / "new"
    new.mkdir()
    sf.write(new / "7_bob_3.wav", clip(300.0, 8000, 0.4, rng), 8000)
    sf.write(new / "8_ann_3.wav", clip(300.0, 8000, 0.4, rng), 8000)
    items, labelled = adapt.scan_target({"target_root": str(new)}, rdm)
    assert labelled and sorted(y for _, y in items) == [0, 1]
    sf.write(new / "unnamed.wav", clip(300.0, 8000, 0.4, rng), 8000)
    with pytest.raises(TLError, match="unnamed.wav: file name does not match"):
        adapt.scan_target({"target_root": str(new)}, rdm)
    for p in new.glob("*_*_*.wav"):
        p.unlink()
    items, labelled = adapt.scan_target({"target_root": str(new)}, rdm)
    assert not labelled and len(items) == 1

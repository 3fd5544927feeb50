"""Few-shot: strategy=prototypes (SimpleShot head) and tl fewshot (episodic evaluation)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tl_cli.commands import evaluate, export, predict
from tl_cli.commands.fewshot import (
    check_episodes,
    episode_accuracy,
    run_episodes,
    sample_episode,
)
from tl_cli.core.errors import TLError
from tl_cli.tasks.loading import load_module
from tl_cli.transfer.prototypes import leave_one_out, prototypes

from .conftest import TINY, TINY_FEATURES, make_image_folder, run_cfg, run_tl


@pytest.fixture(scope="module")
def proto_run(tmp_path_factory, tiny_data):
    """tl train strategy=prototypes on tiny_data (train/ 12 per class + test/ 4 per class)."""
    from tl_cli.commands.train import run

    out = tmp_path_factory.mktemp("proto")
    metrics = run(
        run_cfg(
            [*TINY, f"dataset.root={tiny_data}", "strategy=prototypes", "strategy.center=true"],
            out,
            "train",
        )
    )
    return out, metrics


def _features(module, folder: Path, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features of every image under folder/<class>/ (the eval transform), by hand."""
    from tl_cli.modalities.image.data import eval_transform, load_image

    tf = eval_transform(module.preprocessing)
    xs, ys = [], []
    for y, c in enumerate(classes):
        for p in sorted((folder / c).glob("*.png")):
            xs.append(tf(load_image(p)))
            ys.append(y)
    with torch.no_grad():
        return module.backbone.eval()(torch.stack(xs)).double(), torch.tensor(ys)


def test_prototypes_are_class_means_of_centred_normalised_features(proto_run, tiny_data):
    out, metrics = proto_run
    module, ckpt = load_module(out / "checkpoints" / "best.ckpt")
    assert ckpt["hyper_parameters"]["head"]["name"] == "prototype"
    f, y = _features(module, tiny_data / "train", module.class_names)
    center = f.mean(0)
    z = F.normalize(f - center, dim=1)
    means = torch.stack([z[y == c].mean(0) for c in range(3)])
    head = module.head
    torch.testing.assert_close(head.center.double(), center, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(head.linear.weight.double(), means, atol=1e-4, rtol=1e-4)
    # the logits order classes by Euclidean distance to the prototypes (nearest = highest)
    with torch.no_grad():
        logits = head(f.float()).double()
    dist = torch.cdist(z, means)
    assert torch.equal(logits.argmax(1), dist.argmin(1))
    # one pass, no optimizer steps, all 36 training images (no val carve)
    d = metrics["defaults"]
    assert d["optimizer_steps"] == 0 and d["head_fit"]["method"] == "prototypes"
    assert d["head_fit"]["items"] == 36 and metrics["train_size"] == 36
    assert d["head_fit"]["val_is_train"] and 0.0 <= d["head_fit"]["loo_acc"] <= 1.0
    assert "test/acc" in metrics


def test_without_a_val_split_leave_one_out_is_the_headline(proto_run):
    """Issue 29: strategy=prototypes headlined val/acc measured on its own training items."""
    from tl_cli.core.metrics import train_summary
    from tl_cli.run import gates

    out, metrics = proto_run
    assert (
        metrics["val_is_train"] and metrics["loo/acc"] == metrics["defaults"]["head_fit"]["loo_acc"]
    )
    assert train_summary(metrics)[0] == "loo/acc"
    # a bare gate means the test metric when there is one, else leave-one-out, never val
    no_test = {k: v for k, v in metrics.items() if not k.startswith("test/")}
    assert gates.resolve_train_key("acc", no_test) == "loo/acc"
    assert gates.resolve_train_key("acc", metrics) == "test/acc"
    from tl_cli.commands.train import headline
    from tl_cli.tasks.classification import ClassificationTask

    line = headline(metrics, ClassificationTask)
    assert line.startswith(f"loo/acc {metrics['loo/acc']:.4f} (leave-one-out; val/acc ")
    assert "is measured on the training items" in line and "best epoch" not in line
    report = (out / "report.md").read_text()  # the report says what val is, too
    assert "no val split: val is the training items; loo/acc" in report


def test_prototype_checkpoint_eval_predict_export(proto_run, tiny_data, tmp_path):
    out, _ = proto_run
    ckpt = out / "checkpoints" / "best.ckpt"
    res = evaluate.run(
        run_cfg(
            [f"checkpoint={ckpt}", f"dataset.root={tiny_data / 'test'}"], tmp_path / "ev", "eval"
        )
    )
    assert res["num_samples"] == 12 and res["split"] == "all"
    preds = tmp_path / "p.csv"
    predict.run(
        run_cfg(
            [f"checkpoint={ckpt}", f"inputs={tiny_data / 'test' / 'cat'}", f"output={preds}"],
            tmp_path / "pr",
            "predict",
        )
    )
    assert len(preds.read_text().splitlines()) == 5
    pytest.importorskip("onnxruntime")
    onnx = tmp_path / "m.onnx"
    r = export.run(
        run_cfg([f"checkpoint={ckpt}", "format=onnx", f"output={onnx}"], tmp_path / "ex", "export")
    )
    assert onnx.is_file() and r["passed"] is True


def test_prototypes_from_one_image_per_class(tmp_path):
    """Three classes, one image each, no val/ folder: no carve, the head is the three images."""
    from tl_cli.commands.train import run

    data = make_image_folder(tmp_path / "one", {"": 1})
    m = run(
        run_cfg([*TINY, f"dataset.root={data}", "strategy=prototypes"], tmp_path / "r", "train")
    )
    assert m["train_size"] == 3 and m["val_size"] == 3
    assert m["defaults"]["head_fit"]["loo_acc"] is None  # no class has a second item
    module, _ = load_module(tmp_path / "r" / "checkpoints" / "best.ckpt")
    assert float(module.head.center.abs().max()) == 0.0  # default: no centring (L2N)
    f, y = _features(module, data, module.class_names)
    with torch.no_grad():
        assert torch.equal(module.head(f.float()).argmax(1), y)  # each image is its prototype
    res = evaluate.run(
        run_cfg([f"checkpoint={tmp_path / 'r/checkpoints/best.ckpt'}", f"dataset.root={data}"],
             tmp_path / "ev", "eval")
    )  # fmt: skip
    assert res["acc"] == 1.0 and res["num_samples"] == 3


def test_leave_one_out_matches_refitting_without_the_item():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(13, 6))
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3])  # class 3 has one item
    logits, y = leave_one_out(feats, labels, 4)
    kept = np.flatnonzero(labels != 3)
    assert np.array_equal(y, labels[kept])
    center = feats.mean(0)
    for row, i in enumerate(kept):
        mask = np.arange(13) != i
        _, protos = prototypes(feats[mask], labels[mask], 4, center=center)
        z = (feats[i] - center) / np.linalg.norm(feats[i] - center)
        want = z @ protos.T - 0.5 * (protos**2).sum(1)
        np.testing.assert_allclose(logits[row], want, atol=1e-9)


def test_episodes_disjoint_and_classes_uniform():
    labels = np.repeat(np.arange(20), 20)
    by_class = [np.flatnonzero(labels == c) for c in range(20)]
    rng = np.random.default_rng(123)
    counts = np.zeros(20)
    n = 2000
    for _ in range(n):
        classes, support, query = sample_episode(rng, by_class, 5, 5, 15)
        assert len(set(classes)) == 5
        assert not set(support.ravel()) & set(query.ravel())
        assert len(set(support.ravel()) | set(query.ravel())) == 5 * 20
        for j, c in enumerate(classes):  # row j holds items of class classes[j] only
            assert set(labels[support[j]]) == {c} and set(labels[query[j]]) == {c}
        counts[classes] += 1
    expected = n * 5 / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 43.8  # chi-square, 19 degrees of freedom, p = 0.001


def test_episode_accuracy_and_ci():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(6, 16)) * 5
    labels = np.repeat(np.arange(6), 10)
    feats = centers[labels] + rng.normal(size=(60, 16)) * 0.1
    res = run_episodes(feats, labels, 5, [1, 3], 5, 50, seed=0)
    assert set(res) == {"1", "3"} and all(
        r["acc"] == 1.0 and r["ci95"] == 0.0 for r in res.values()
    )
    noisy = rng.normal(size=(60, 16))
    r = run_episodes(noisy, labels, 5, [1], 5, 200, seed=1)["1"]
    assert 0.1 < r["acc"] < 0.35  # chance is 0.2
    assert r["ci95"] == pytest.approx(1.96 * r["std"] / np.sqrt(200))
    # the same seed draws the same episodes
    assert run_episodes(noisy, labels, 5, [1], 5, 20, seed=1) == run_episodes(
        noisy, labels, 5, [1], 5, 20, seed=1
    )
    support = np.arange(0, 50, 10).reshape(5, 1)
    query = support + 1
    assert episode_accuracy(feats, support, query) == 1.0
    assert episode_accuracy(feats, support, query, center="support") == 1.0


@pytest.mark.parametrize(
    ("counts", "n_way", "shots", "n_query", "match"),
    [
        ({"a": 20, "b": 20}, 5, [1], "auto", r"n_way=5 exceeds the 2 classes"),
        ({"a": 20, "b": 7}, 2, [1, 5], 15, r"class 'b' .* has 7 items; n_shot=5 \+ n_query=15 needs 20"),
        ({"a": 20, "b": 5}, 2, [5], "auto", r"class 'b' .* has 5 items; n_shot=5 needs at least 6"),
    ],
)  # fmt: skip
def test_episode_errors_are_one_line(counts, n_way, shots, n_query, match):
    with pytest.raises(TLError, match=match):
        check_episodes(counts, n_way, shots, n_query, "DIR")


def test_n_query_auto_fits_the_smallest_class():
    assert check_episodes({"a": 30, "b": 30}, 2, [1, 5], "auto", "DIR") == 15
    assert check_episodes({"a": 30, "b": 12}, 2, [1, 5], "auto", "DIR") == 7


def test_fewshot_command_writes_fewshot_json(tiny_data, tmp_path):
    from tl_cli.commands import fewshot

    out = tmp_path / "fs"
    doc = fewshot.run(
        run_cfg(
            [*TINY_FEATURES, f"dataset.root={tiny_data}", "n_way=3", "n_shot=[1,2]", "episodes=40"],
            out,
            "fewshot",
        )
    )
    saved = json.loads((out / "fewshot.json").read_text())
    assert saved["n_way"] == 3 and saved["episodes"] == 40
    assert set(saved["results"]) == {"1", "2"}
    for r in saved["results"].values():
        assert 0.0 <= r["acc"] <= 1.0 and r["ci95"] >= 0.0
    assert saved["num_items"] == 48 and saved["n_query"] == 14  # train 12 + test 4 per class
    assert doc["results"] == saved["results"]


@pytest.mark.parametrize(
    "arg,says",
    [
        ("n_way=4", "n_way=4 exceeds the 3 classes"),
        # issue 23: episodes=1e11 ran unbounded; refused before any feature is extracted
        ("episodes=1e11", "episodes=100000000000 must be at most 100000"),
    ],
)
def test_fewshot_cli_error_exit_2_one_line(tiny_data, tmp_path, arg, says):
    r = run_tl(
        "fewshot",
        *TINY_FEATURES,
        f"dataset.root={tiny_data}",
        arg,
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and says in lines[0], lines
    assert not (tmp_path / "run" / "fewshot.json").exists()

"""Domain Separation Networks (``adapt=dsn``, issue 28): the losses as defined on tiny cases, the
target labels never reaching training, disentangle.png, and a checkpoint that holds only what
predicts (eval, predict and export unchanged), for every adapter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from tests.conftest import compose_cfg, make_image_folder
from tests.test_adapt import _scramble, cfg_for
from tl_cli.commands import evaluate, export, predict, train
from tl_cli.core.errors import TLError
from tl_cli.run import training
from tl_cli.tasks.loading import load_module
from tl_cli.transfer import adapt, dsn

SMALL = ["adapt.bottleneck=16", "adapt.hidden=32"]


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("target"), {"": 6}, seed=7)


# --------------------------------------------------------------------------- the losses


def test_difference_loss_is_zero_for_orthogonal_codes_and_one_for_identical_ones() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 10, generator=g, dtype=torch.float64)
    x = x - x.mean(0)
    q, _ = torch.linalg.qr(x)  # orthonormal, still centred columns (combinations of centred ones)
    shared, private = q[:, :6] * 3.0, q[:, 6:] * 0.1  # any scale
    assert float(dsn.difference_loss(shared, private)) == pytest.approx(0.0, abs=1e-12)
    # + a per-column offset: centring over the batch removes it
    assert float(dsn.difference_loss(shared + 5.0, private - 2.0)) == pytest.approx(0.0, abs=1e-12)
    same = torch.randn(32, 4, generator=g, dtype=torch.float64)
    # S^T P of unit columns: the diagonal is 1, the rest the columns' correlations
    d = float(dsn.difference_loss(same, same))
    c = torch.corrcoef(same.T)
    assert d == pytest.approx(float(c.square().mean()), rel=1e-9)
    assert float(dsn.difference_loss(same, same[:, :1])) > 0.2
    # ... and its gradient pushes correlated codes apart
    s = same.clone().requires_grad_(True)
    dsn.difference_loss(s, same.detach()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_reconstruction_loss_is_exact_for_an_identity_decoder_and_blind_to_offsets() -> None:
    g = torch.Generator().manual_seed(1)
    f = torch.randn(16, 12, generator=g) * 7
    shared, private = 0.3 * f, 0.7 * f  # codes that add up to the input
    identity = torch.nn.Identity()
    assert float(dsn.reconstruction_loss(f, identity(shared + private))) == pytest.approx(
        0.0, abs=1e-6
    )
    # scale-invariant MSE: a constant offset per row costs nothing
    off = f + torch.arange(16, dtype=f.dtype)[:, None]
    assert float(dsn.scale_invariant_mse(f, off).abs().max()) < 1e-4
    # relative to the row's spread: a constant reconstruction scores 1, on any feature scale
    for scale in (1e-3, 1.0, 1e3):
        z = dsn.reconstruction_loss(scale * f, torch.zeros_like(f))
        assert float(z) == pytest.approx(1.0, rel=1e-5)
    # the definition: (1/k)||d||^2 - (1/k^2)(sum d)^2
    d = f - 0.5 * f.flip(1)
    k = f.shape[1]
    want = (d.square().sum(1) / k - d.sum(1).square() / k**2)[3]
    assert float(dsn.scale_invariant_mse(f, 0.5 * f.flip(1))[3]) == pytest.approx(float(want))


def test_mmd_is_zero_between_a_batch_and_itself_and_grows_with_a_shift() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(24, 8, generator=g)
    assert float(dsn.mmd_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    near, far = (float(dsn.mmd_loss(a, a + s)) for s in (0.2, 3.0))
    assert 0 < near < far


# --------------------------------------------------------------------------- training


def _dsn(source: Path, target: Path, out: Path, *extra: str):
    return cfg_for(source, target, out, "adapt=dsn", *SMALL, *extra)


@pytest.mark.parametrize("similarity", ["dann", "mmd"])
def test_target_labels_never_reach_dsn_training(
    tiny_data: Path, target_dir: Path, tmp_path: Path, monkeypatch, similarity: str
) -> None:
    extra = [f"adapt.similarity={similarity}"]
    m1 = train.run(_dsn(tiny_data, target_dir, tmp_path / "a", *extra))
    _scramble(monkeypatch)
    m2 = train.run(_dsn(tiny_data, target_dir, tmp_path / "b", *extra))
    assert [r["train/loss"] for r in m1["history"]] == [r["train/loss"] for r in m2["history"]]
    assert [r["train/recon_loss"] for r in m1["history"]] == [
        r["train/recon_loss"] for r in m2["history"]
    ]
    sd1 = torch.load(tmp_path / "a/checkpoints/best.ckpt", weights_only=True)["state_dict"]
    sd2 = torch.load(tmp_path / "b/checkpoints/best.ckpt", weights_only=True)["state_dict"]
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert m1["defaults"]["optimizer_steps"] > 0
    assert "target/acc" in m1 and "target/acc" in m2


def test_dsn_run_plots_and_saves_only_what_predicts(
    tiny_data: Path, target_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "dsn"
    m = train.run(_dsn(tiny_data, target_dir, out))
    assert m["adapt"] == "dsn" and m["best_epoch"] == m["epochs"]
    hist = m["history"][-1]
    for k in ("train/recon_loss", "train/diff_loss", "train/domain_loss"):
        assert np.isfinite(hist[k]), k
    for png in ("domains.png", "disentangle.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    module, raw = load_module(out / "checkpoints" / "best.ckpt")
    assert raw["hyper_parameters"]["head"]["name"] == "bottleneck"
    keys = set(raw["state_dict"])
    assert all(k.startswith(("backbone.", "head.")) for k in keys), sorted(keys)[:5]
    # the shared encoder is the head's bottleneck: the same keys as a DANN checkpoint's
    assert {k for k in keys if k.startswith("head.")} == {
        k for k in module.state_dict() if k.startswith("head.")
    }


def test_dsn_encoders_read_backbone_features_and_the_decoder_rebuilds_them(
    tiny_data: Path, target_dir: Path
) -> None:
    module, dm = training.build(_dsn(tiny_data, target_dir, Path("unused")))
    a = module.adapter
    assert isinstance(a, dsn.DSN)
    nf = module.backbone.num_features
    assert a.private["source"][0].in_features == nf and a.decoder.out_features == nf
    assert a.private["target"][0].out_features == module.head[-1].in_features == 16
    # not submodules of the task: never in its state dict
    assert not any("private" in k or "decoder" in k for k in module.state_dict())
    m = _dsn(tiny_data, target_dir, Path("unused"), "adapt.similarity=mmd")
    module2, _ = training.build(m)
    assert module2.adapter.discriminator is None


def test_dsn_bad_options_are_one_line() -> None:
    with pytest.raises(TLError, match="adapt=dsn: similarity"):
        adapt.ADAPTERS.build({"name": "dsn", "similarity": "cosine"})
    with pytest.raises(TLError, match="recon_weight"):
        adapt.ADAPTERS.build({"name": "dsn", "recon_weight": -1})


# --------------------------------------------------------------------------- every adapter


@pytest.mark.parametrize("method", ["none", "adabn", "dann", "self_training", "dsn"])
def test_every_adapters_checkpoint_evaluates_predicts_and_exports(
    tiny_data: Path, target_dir: Path, tmp_path: Path, method: str
) -> None:
    extra = [f"adapt={method}", "trainer.max_epochs=1"]
    if method in ("dann", "dsn"):
        extra += SMALL
    out = tmp_path / "run"
    m = train.run(cfg_for(tiny_data, target_dir, out, *extra))
    ckpt = out / "checkpoints" / "best.ckpt"
    ecfg = compose_cfg([f"checkpoint={ckpt}", f"dataset.root={target_dir}"], config_name="eval")
    with open_dict(ecfg):
        ecfg.output_dir = str(tmp_path / "eval")
    # the checkpoint scores the target as training did (AdaBN's carries the target statistics)
    assert evaluate.run(ecfg)["acc"] == pytest.approx(m["target/acc"], abs=1e-6)
    pcfg = compose_cfg(
        [f"checkpoint={ckpt}", f"inputs={target_dir}", f"output={tmp_path / 'p.csv'}"],
        config_name="predict",
    )
    with open_dict(pcfg):
        pcfg.output_dir = str(tmp_path / "pred")
    predict.run(pcfg)
    rows = (tmp_path / "p.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + m["target_size"]
    xcfg = compose_cfg(
        [f"checkpoint={ckpt}", "format=torchscript", f"output={tmp_path / 'm.pt'}"],
        config_name="export",
    )
    with open_dict(xcfg):
        xcfg.output_dir = str(tmp_path / "exp")
    res = export.run(xcfg)
    side = json.loads((tmp_path / "m.json").read_text())
    assert side["verification"]["passed"] is True, (res, side["verification"])

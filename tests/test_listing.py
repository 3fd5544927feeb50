"""tl backbones [filter]: registered backbones with source, size, params and offline weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tl_cli.commands import backbones as listing
from tl_cli.modalities.backbones import build_backbone, count_params, registered_backbones
from tl_cli.modalities.image.backbones import create_backbone

from .conftest import compose_cfg, run_tl


def test_every_registered_backbone_is_listed_with_facts():
    rows, left_out = listing.collect(None)
    assert [r.name for r in rows] == list(registered_backbones()) and left_out == 0
    by = {r.name: r for r in rows}
    assert by["efficientnet_lite0"].source == "bundled" and by["resnet50"].source == "torchvision"
    assert all(r.params and r.params > 100_000 for r in rows)
    images = [r for r in rows if r.source in ("bundled", "torchvision", "timm")]
    assert all(r.image_size for r in images) and by["minilm"].image_size is None
    assert by["minilm"].offline and by["speech_embedding"].offline  # bundled in their packages
    # one registry for every modality: the rows say what each backbone reads
    assert (by["efficientnet_lite0"].modality, by["minilm"].modality) == ("image", "text")
    assert by["speech_embedding"].modality == "audio"
    # the bundled package is a dependency: its weights are there without network
    assert by["efficientnet_lite0"].offline is True
    assert by["efficientnet_lite0"].image_size == 224 and by["efficientnet_lite2"].image_size == 260
    # torchvision resnet18: 11,689,512 with its ImageNet classifier, tl removes the 513,000 of it
    assert by["resnet18"].params == 11_176_512


def test_registry_rows_equal_the_real_backbones():
    """`tl backbones` reads params and input size from the registry rows (no model built): each
    row must equal what its builder builds, and torchvision's file names and sizes its tables."""
    from torchvision.models import get_model_weights

    for name, spec in registered_backbones().items():
        cfg = {"name": name, "source": spec.source}
        if spec.modality == "image":
            with torch.device("meta"):
                bb = build_backbone({**cfg, "weights": "none"}, pretrained=False)
            assert spec.input_size == int(bb.preprocessing["input_size"]), name
        else:
            bb = build_backbone(cfg, pretrained=False)
            assert spec.input_size is None, name
        assert spec.params == count_params(bb), name
        if spec.source == "torchvision":
            w = get_model_weights(spec.arch).DEFAULT
            assert spec.weights_file == Path(w.url).name, name
            assert spec.download_mb == w.meta["_file_size"], name


def test_registered_rows_import_no_torch():
    """`tl backbones` without a filter lists the registry: no torch, timm or torchvision."""
    import subprocess
    import sys

    code = (
        "import sys; from tl_cli.commands.backbones import main; rc = main(['--json']); "
        "heavy = sorted(m for m in ('torch', 'timm', 'torchvision', 'transformers') "
        "if m in sys.modules); print(rc, heavy)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip().splitlines()[-1] == "0 []", r.stdout[-500:] + r.stderr[-2000:]


def test_torch_hub_dir_is_torchs(monkeypatch, tmp_path):
    for env in ({}, {"TORCH_HOME": str(tmp_path / "th")}, {"XDG_CACHE_HOME": str(tmp_path / "x")}):
        monkeypatch.delenv("TORCH_HOME", raising=False)
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert listing.torch_hub_dir() == Path(torch.hub.get_dir()), env


def test_registered_torchvision_weights_offline_only_when_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    spec = registered_backbones()["resnet18"]
    info = listing.registered(spec)
    assert info.offline is False and info.weights == "45 MB download"
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(b"x")
    info = listing.registered(spec)
    assert info.offline is True and info.weights == "cached"


def test_torchvision_weights_offline_only_when_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert listing.describe("resnet18", "torchvision").offline is False
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints/resnet18-f37072fd.pth").write_bytes(b"x")
    info = listing.describe("resnet18", "torchvision")
    assert info.offline is True and info.weights == "cached"


def test_filter_searches_registered_torchvision_and_timm():
    rows, _ = listing.collect("resnet1", limit=0)
    keys = [(r.name, r.source) for r in rows]
    assert keys[0] == ("resnet18", "torchvision") and rows[0].usage == "backbone=resnet18"
    assert ("resnet101", "torchvision") in keys and keys.count(("resnet18", "torchvision")) == 1
    timm_rows = [r for r in rows if r.source == "timm"]
    assert timm_rows and all("resnet1" in r.name for r in timm_rows)
    assert timm_rows[0].usage.startswith("backbone=timm backbone.name=")
    rows, left_out = listing.collect("resnet", limit=3)
    assert (
        len([r for r in rows if r.usage.startswith("backbone=torchvision") or r.source == "timm"])
        == 3
    )
    assert left_out > 10


def test_glob_filter_and_tiny_timm_model():
    rows, _ = listing.collect("test_eff*", limit=0)
    info = next(r for r in rows if r.name == "test_efficientnet")
    assert (
        info.source == "timm"
        and info.offline is False
        and info.params
        == count_params(
            create_backbone("test_efficientnet", source="timm", weights="none", pretrained=False)
        )
    )


def test_main_prints_table_json_and_errors(capsys):
    assert listing.main(["lite"]) == 0
    out = capsys.readouterr().out
    assert "efficientnet_lite0" in out and "bundled" in out and "yes" in out and "3.4M" in out
    assert listing.main(["lite", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {d["name"] for d in data} >= {
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
    }
    assert set(data[0]) == {
        "name",
        "source",
        "modality",
        "params",
        "image_size",
        "offline",
        "weights",
        "usage",
    }
    assert listing.main(["no_such_backbone_xyz"]) == 1
    assert "no backbone matches 'no_such_backbone_xyz'" in capsys.readouterr().err
    assert listing.main(["--limit", "x"]) == 2
    assert listing.main(["a", "b"]) == 2


@pytest.mark.parametrize("filter_args", [[], ["resnet1", "--limit", "4"]])
def test_printed_overrides_compose_to_the_listed_backbone(capsys, filter_args):
    """What `tl backbones` tells users to type (``backbone=...``) composes with Hydra into that
    backbone, and the composed config builds it (``create_backbone(**cfg.backbone)``)."""
    assert listing.main([*filter_args, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    sources = {r["source"] for r in rows}
    assert sources == (
        {"bundled", "torchvision", "minilm", "speech"}
        if not filter_args
        else {"torchvision", "timm"}
    )
    for r in rows:
        cfg = compose_cfg(r["usage"].split()).backbone
        assert (cfg.name, cfg.source) == (r["name"], r["source"]), r["usage"]
        if r["source"] in ("bundled", "torchvision", "timm"):
            with torch.device("meta"):
                bb = create_backbone(**cfg, pretrained=False)
        else:  # text / audio builders
            bb = build_backbone(cfg, pretrained=False)
        assert (bb.name, bb.source) == (r["name"], r["source"])


def test_cli_backbones(tmp_path: Path):
    r = run_tl("backbones", "mobilenet_v3_l", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "mobilenet_v3_large" in r.stdout and "torchvision" in r.stdout and "4.2M" in r.stdout
    assert not list(tmp_path.iterdir())  # a plain command: no Hydra run dir
    bad = run_tl("backbones", "--nope", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith(
        "tl: error: tl backbones: unknown option '--nope'"
    )

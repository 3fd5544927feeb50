"""tl pretrain: the NT-Xent loss, a tiny SimCLR run, its weights reaching tl train, and refusals."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from tl_cli.core.errors import TLError

from .conftest import TINY, compose_cfg, make_image_folder, run_tl

STEPS = 4


def _pretrain_cfg(root: Path, out: Path, *extra: str):
    cfg = compose_cfg(
        [
            *TINY,
            f"dataset.root={root}",
            f"trainer.max_steps={STEPS}",
            "trainer.max_epochs=-1",  # TINY's 2 epochs would count instead of the steps
            *extra,
        ],
        "pretrain",
    )
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """18 images: 12 in class folders (names to be ignored) + 6 two levels deeper; a symlink loop
    and a hidden folder that add none."""
    root = make_image_folder(tmp_path_factory.mktemp("unl"), {"": 4, "deep/er": 2}, size=24)
    (root / "deep" / "loop").symlink_to(root, target_is_directory=True)  # walked once
    (root / ".hidden").mkdir()
    shutil.copy(root / "cat" / "cat_000.png", root / ".hidden" / "x.png")  # skipped
    return root


@pytest.fixture(scope="module")
def pretrained(unlabelled: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tl_cli.commands.pretrain import run

    out = tmp_path_factory.mktemp("pre") / "run"
    run(_pretrain_cfg(unlabelled, out, "pretrain.head_warmup_steps=1", "pretrain.warmup_steps=1"))
    return out


def test_ntxent_matches_hand_computation():
    """The loss the module trains with is SimCLR's NT-Xent over 2N views (computed by hand here)."""
    from tl_cli.transfer.simclr import SimCLRModule

    class _Stub(torch.nn.Module):
        num_features = 2

    p = {"temperature": 0.5, "hidden_dim": 4, "projection_dim": 2, "bn": "frozen"}
    crit = SimCLRModule(_Stub(), p, max_steps=1).criterion
    z0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z1 = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    # the four views L2-normalised: z0[0], z0[1], z1[0], z1[1]
    views = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.5**0.5, 0.5**0.5]]
    pos = {0: 2, 1: 3, 2: 0, 3: 1}  # view i of image k pairs with the other view of image k
    total = 0.0
    for i in range(4):
        sims = {
            j: sum(a * b for a, b in zip(views[i], views[j], strict=True)) / 0.5
            for j in range(4)
            if j != i
        }
        total += -(sims[pos[i]] - math.log(sum(math.exp(s) for s in sims.values())))
    assert float(crit(z0, z1)) == pytest.approx(total / 4, rel=1e-5)
    # the pairing matters: swapping the second view's images changes the loss
    assert float(crit(z0, z1.flip(0))) != pytest.approx(total / 4, rel=1e-3)


def test_backbone_lr_waits_for_the_head():
    from tl_cli.transfer.simclr import warmup_cosine

    f = [warmup_cosine(s, warmup=2, total=10, start=3) for s in range(10)]
    assert f[:3] == [0.0, 0.0, 0.0]  # projection head warm-up: backbone untouched
    assert 0 < f[3] < f[4] <= 1.0 and f[-1] < f[5]  # then warm-up, then cosine decay
    assert warmup_cosine(0, warmup=0, total=10) == 1.0


def test_pretrain_writes_weights_that_tl_train_starts_from(
    pretrained: Path, unlabelled: Path, tiny_data: Path, tmp_path: Path
):
    import pytorch_lightning as pl
    from safetensors.torch import load_file

    from tl_cli.commands.train import run
    from tl_cli.modalities.backbones import build_backbone

    meta = json.loads((pretrained / "pretrain.json").read_text())
    assert meta["backbone"]["name"] == "test_efficientnet"
    assert meta["data"]["images"] == 18  # nested folders found, class folder names unused
    assert meta["steps"] == STEPS and len(meta["loss"]["curve"]) == STEPS
    assert (pretrained / "pretrain_curves.png").stat().st_size > 0
    saved = load_file(str(pretrained / "backbone.safetensors"))

    # the weights the run started from (same seed, same random init) changed
    pl.seed_everything(42, verbose=False)
    init = build_backbone(compose_cfg([*TINY], "pretrain").backbone).model.state_dict()
    assert set(saved) == set(init)
    moved = [k for k in saved if not torch.equal(saved[k], init[k])]
    assert any(k.endswith(".weight") for k in moved)
    # pretrain.bn=frozen: BatchNorm statistics are the initial ones
    assert all(torch.equal(saved[k], init[k]) for k in saved if "running_" in k)

    # tl train init=RUN: the run's (frozen) backbone is exactly the saved one
    cfg = compose_cfg(
        [*TINY, f"dataset.root={tiny_data}", "trainer.max_epochs=1", f"init={pretrained}"]
    )
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "train")
    run(cfg)
    assert cfg.backbone.weights_path == str(pretrained / "backbone.safetensors")
    ckpt = torch.load(tmp_path / "train/checkpoints/best.ckpt", weights_only=True)
    got = {
        k.removeprefix("backbone.model."): v
        for k, v in ckpt["state_dict"].items()
        if k.startswith("backbone.model.")
    }
    assert set(got) == set(saved)
    assert all(torch.equal(got[k], saved[k]) for k in saved)


def test_refuses_an_earlier_run_dir(pretrained: Path, unlabelled: Path):
    from tl_cli.commands.pretrain import run

    before = (pretrained / "backbone.safetensors").read_bytes()
    with pytest.raises(TLError, match="backbone.safetensors already exists.*overwrite=true"):
        run(_pretrain_cfg(unlabelled, pretrained))
    assert (pretrained / "backbone.safetensors").read_bytes() == before


def test_no_images_is_one_line(tmp_path: Path):
    from tl_cli.commands.pretrain import run

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("x")
    with pytest.raises(
        TLError, match=r"dataset.root=.*empty: no images \(any still image Pillow reads"
    ):
        run(_pretrain_cfg(tmp_path / "empty", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_init_checks_the_backbone_name(pretrained: Path, tmp_path: Path):
    from tl_cli.transfer.simclr import apply_init, resolve_init

    f = pretrained / "backbone.safetensors"
    assert resolve_init(f, {"name": "test_efficientnet"}) == str(f.resolve())
    with pytest.raises(TLError, match="pretrained from backbone 'test_efficientnet'.*'resnet18'"):
        resolve_init(pretrained, {"name": "resnet18"})
    with pytest.raises(TLError, match="no backbone.safetensors there"):
        resolve_init(tmp_path, {"name": "test_efficientnet"})
    cfg = compose_cfg([*TINY, f"init={pretrained}", f"backbone.weights_path={f}"])
    with pytest.raises(TLError, match="not both"):
        apply_init(cfg)


def test_cli_refuses_text(unlabelled: Path, tmp_path: Path):
    r = run_tl(
        "pretrain", "modality=text", f"dataset.root={unlabelled}", f"hydra.run.dir={tmp_path}"
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "tl: error: modality=text: tl pretrain supports images for now (modality=image)"
    )


def test_cli_refuses_a_huge_image_size_up_front(unlabelled: Path, tmp_path: Path):
    """Issue 23: dataset.image_size=100000 died in a DataLoader worker with a traceback."""
    r = run_tl(
        "pretrain",
        *[a for a in TINY if a.startswith("backbone")],
        f"dataset.root={unlabelled}",
        "dataset.image_size=100000",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[0].startswith("tl: error: dataset.image_size=100000 must be in [16, 1024]")
    assert not (tmp_path / "run" / "backbone.safetensors").exists()


def test_warmups_shrink_to_fit_a_short_run():
    """Issue 29: trainer.max_steps=20 with the 50-step head warm-up left the backbone's LR at 0
    for the whole run (weights bit-identical to the pretrained ones, a loss drop reported)."""
    from tl_cli.commands.pretrain import fit_warmups

    p = {"head_warmup_steps": 50, "warmup_steps": 50}
    line = fit_warmups(p, 20)
    assert p == {"head_warmup_steps": 5, "warmup_steps": 5} and "shortened to 5 + 5" in line
    p = {"head_warmup_steps": 50, "warmup_steps": 50}
    assert fit_warmups(p, 500) is None and p["head_warmup_steps"] == 50  # the defaults fit


def test_default_warmups_on_a_short_run_still_train_the_backbone(
    unlabelled: Path, tmp_path: Path, capsys
):
    import pytorch_lightning as pl
    from safetensors.torch import load_file

    from tl_cli.commands.pretrain import run
    from tl_cli.modalities.backbones import build_backbone

    out = tmp_path / "run"
    meta = run(_pretrain_cfg(unlabelled, out))  # STEPS=4 < the default 50 + 50 warm-up steps
    assert "do not fit 4 steps" in capsys.readouterr().out
    assert meta["settings"]["head_warmup_steps"] + meta["settings"]["warmup_steps"] == 2
    pl.seed_everything(42, verbose=False)
    init = build_backbone(compose_cfg([*TINY], "pretrain").backbone).model.state_dict()
    saved = load_file(str(out / "backbone.safetensors"))
    assert any(not torch.equal(saved[k], init[k]) for k in saved if k.endswith(".weight"))


def test_max_epochs_counts_in_steps_and_says_so(unlabelled: Path, tmp_path: Path, capsys):
    from tl_cli.commands.pretrain import run

    cfg = _pretrain_cfg(
        unlabelled, tmp_path / "run", "trainer.max_epochs=1", "dataset.batch_size=6"
    )
    meta = run(cfg)
    out = capsys.readouterr().out
    assert meta["steps"] == 3  # 18 images at batch 6, full batches: 3 steps per epoch
    assert "trainer.max_epochs=1: 1 x 3 steps" in out and "trainer.max_steps=4 is not used" in out
    # the next command trains at the size the backbone was pretrained at
    assert "dataset.image_size=32" in out.split("next:", 1)[1]


@pytest.mark.parametrize("inside_step", [False, True])
def test_interrupt_keeps_the_backbone_and_exits_130(
    unlabelled: Path, tmp_path: Path, monkeypatch, inside_step: bool
):
    import signal

    from tl_cli.commands.pretrain import run
    from tl_cli.transfer.simclr import SimCLRModule

    step = SimCLRModule.training_step

    def interrupted(self, batch, i):
        if inside_step:  # Ctrl-C in the 4th step, after its loss, before its update
            loss = step(self, batch, i)
            if len(self.losses) == 4:
                raise KeyboardInterrupt
            return loss
        if len(self.losses) == 3:
            raise KeyboardInterrupt  # Ctrl-C after three optimizer steps
        return step(self, batch, i)

    monkeypatch.setattr(SimCLRModule, "training_step", interrupted)
    handler = signal.getsignal(signal.SIGINT)
    out = tmp_path / "run"
    try:
        with pytest.raises(TLError) as e:
            run(
                _pretrain_cfg(
                    unlabelled, out, "trainer.max_steps=10", "pretrain.head_warmup_steps=0"
                )
            )
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after an interrupt
    assert e.value.exit_code == 130
    assert "interrupted (SIGINT) at step 3/10; kept the backbone so far" in str(e.value)
    meta = json.loads((out / "pretrain.json").read_text())
    assert meta["interrupted"] is True and meta["steps"] == 3 and meta["planned_steps"] == 10
    assert (out / "backbone.safetensors").stat().st_size > 0


def test_interrupt_during_the_head_warmup_writes_nothing(
    unlabelled: Path, tmp_path: Path, monkeypatch
):
    import signal

    from tl_cli.commands.pretrain import run
    from tl_cli.transfer.simclr import SimCLRModule

    step = SimCLRModule.training_step

    def interrupted(self, batch, i):
        if len(self.losses) == 2:
            raise KeyboardInterrupt
        return step(self, batch, i)

    monkeypatch.setattr(SimCLRModule, "training_step", interrupted)
    handler = signal.getsignal(signal.SIGINT)
    out = tmp_path / "run"
    try:
        with pytest.raises(TLError, match="before the backbone had changed.*nothing written") as e:
            run(_pretrain_cfg(unlabelled, out, "trainer.max_steps=40"))  # head warm-up: 10 steps
    finally:
        signal.signal(signal.SIGINT, handler)
    assert e.value.exit_code == 130 and not (out / "backbone.safetensors").exists()

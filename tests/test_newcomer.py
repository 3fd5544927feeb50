"""Issue #11: a newcomer's first hour (wrong results, raw errors, lost information)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import open_dict

from tl_cli.cli import config_dir
from tl_cli.core.errors import TLError

from .conftest import TINY, compose_cfg, run_tl


class ConstantPredictions(pl.Callback):
    """Before every validation: a head that always predicts the last class (worst-case val/acc)."""

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        lin = pl_module.head[-1]
        with torch.no_grad():
            lin.weight.zero_()
            lin.bias.zero_()
            lin.bias[-1] = 1.0


def _cfg(tiny_data: Path, out: Path, *extra: str):
    cfg = compose_cfg([*TINY, f"dataset.root={tiny_data}", *extra])
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


# ----------------------------------------------------------------------------- wrong results


def test_resume_into_new_dir_reports_the_weights_of_best_ckpt(tiny_data: Path, tmp_path: Path):
    """best.ckpt, best_epoch, val/acc and test/* describe the same weights after a resume."""
    from tl_cli.commands.evaluate import run as evaluate
    from tl_cli.commands.train import run as train

    train(_cfg(tiny_data, tmp_path / "r1", "strategy=finetune"))
    # the resumed epoch can only tie or lose against the first run's best
    m = train(
        _cfg(
            tiny_data,
            tmp_path / "r2",
            "strategy=finetune",
            "trainer.max_epochs=3",
            f"ckpt_path={tmp_path / 'r1/checkpoints/last.ckpt'}",
        ),
        callbacks=[ConstantPredictions()],
    )
    best = tmp_path / "r2/checkpoints/best.ckpt"
    assert m["best_checkpoint"] == str(best)
    saved = torch.load(best, weights_only=True)
    assert saved["epoch"] + 1 == m["best_epoch"]
    ecfg = compose_cfg([f"checkpoint={best}", "split=val"], "eval")
    with open_dict(ecfg):
        ecfg.output_dir = str(tmp_path / "ev")
    res = evaluate(ecfg)
    assert res["acc"] == pytest.approx(m["val/acc"], abs=1e-6)
    assert res["loss"] == pytest.approx(m["val/loss"], abs=1e-4)


def preflight(command: str, *args: str) -> list[str]:
    from tl_cli.cli import COMMANDS
    from tl_cli.run.preflight import Preflight

    return Preflight(command, COMMANDS[command][0], config_dir()).run(list(args))


def preflight_error(command: str, *args: str) -> str:
    with pytest.raises(TLError) as e:
        preflight(command, *args)
    return str(e.value)


def test_dataset_root_alone_selects_the_folder_dataset(tiny_data: Path):
    assert "dataset=imagefolder" in preflight("train", f"dataset.root={tiny_data}")
    # an explicit dataset= stays the user's choice; eval has its own dataset.root rule
    assert (
        preflight("train", "dataset=imagefolder", f"dataset.root={tiny_data}").count(
            "dataset=imagefolder"
        )
        == 1
    )
    assert "dataset=imagefolder" not in preflight(
        "eval", "checkpoint=x.ckpt", f"dataset.root={tiny_data}"
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["+epochs=1"], "did you mean trainer.max_epochs=1"),
        (["epochs=1"], "did you mean trainer.max_epochs=1"),
        (["+trainer.max_epoch=2"], "did you mean trainer.max_epochs=2"),
        (["+lr_finder.foo=1"], "lr_finder.foo is not a key of lr_finder"),
    ],
)
def test_unknown_keys_are_errors(args, says):
    msg = preflight_error("train", *args)
    assert says in msg and "+" not in msg.split("did you mean")[-1]


def test_known_additions_pass():
    out = preflight("train", "+trainer.fast_dev_run=1", "+callbacks.es.monitor=val/acc")
    assert "+trainer.fast_dev_run=1" in out


def test_tilde_is_expanded_in_every_path(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("HOME", str(tmp_path))
    out = preflight(
        "train", "dataset=imagefolder", "dataset.root=~/data/flowers", "ckpt_path=~/x.ckpt"
    )
    assert f"dataset.root={tmp_path}/data/flowers" in out
    assert f"ckpt_path={tmp_path}/x.ckpt" in out
    out = preflight("predict", "checkpoint=~/m.ckpt", "inputs=~/photos", "output=~/p.csv")
    assert f"inputs={tmp_path}/photos" in out and f"output={tmp_path}/p.csv" in out


@pytest.mark.parametrize(
    ("command", "args", "says"),
    [
        (
            "eval",
            ["runs/fe/checkpoints/best.ckpt"],
            "did you mean checkpoint=runs/fe/checkpoints/best.ckpt?",
        ),
        ("train", ["--epochs", "5"], "use trainer.max_epochs=5"),
        ("train", ["--lr", "1e-3"], "use optimizer.lr=1e-3"),
        ("train", ["--lr=1e-3"], "use optimizer.lr=1e-3"),
        ("train", ["strategy=finetuning"], "did you mean strategy=finetune?"),
        ("train", ["trainer.max_epoch=2"], "did you mean trainer.max_epochs=2"),
        ("train", ["trainer.fast_dev_run=1"], "+trainer.fast_dev_run=1"),
        ("train", ["resnet18"], "did you mean backbone=resnet18?"),
        ("train", ["seed=1,2"], "add -m"),
        ("train", ["+seed=3"], "drop the +"),
        ("train", ["-m", "seed=1,2", "trainer.max_epoch=3"], "did you mean trainer.max_epochs=3"),
    ],
)
def test_hydra_errors_become_one_line_with_a_suggestion(command, args, says):
    msg = preflight_error(command, *args)
    assert says in msg
    assert "\n" not in msg and "search path" not in msg.lower()


def test_hydra_error_from_the_command_line_exits_2_with_one_line():
    r = run_tl("eval", "runs/fe/checkpoints/best.ckpt")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "tl: error: 'runs/fe/checkpoints/best.ckpt' is not an override: "
        "did you mean checkpoint=runs/fe/checkpoints/best.ckpt?"
    ]


def test_checkpoint_run_dir_uses_its_best_ckpt(good_ckpt: Path, capsys):
    run = good_ckpt.parent.parent
    out = preflight("eval", f"checkpoint={run}")
    assert f"checkpoint={good_ckpt}" in out
    assert f"using {good_ckpt}" in capsys.readouterr().out
    assert f"ckpt_path={run / 'checkpoints/last.ckpt'}" in preflight("train", f"ckpt_path={run}")


# ----------------------------------------------------------------------------- lost reasons


def test_error_reason_of_a_wrapped_exception_is_shown():
    from hydra.errors import InstantiationException

    from tl_cli.core.errors import describe

    try:
        try:
            raise ValueError("devices=0 is not valid")
        except ValueError as inner:
            raise InstantiationException(
                "Error in call to target 'pytorch_lightning.Trainer':\nValueError('devices=0 is not valid')\nfull_key: trainer"
            ) from inner
    except InstantiationException as e:
        assert describe(e) == "ValueError: devices=0 is not valid"


def check(*overrides: str) -> str:
    from tl_cli.run.validate import check_train_config

    cfg = compose_cfg([*TINY, "dataset.root=/nonexistent", *overrides])
    with pytest.raises(TLError) as e:
        check_train_config(cfg)
    return str(e.value)


@pytest.mark.parametrize(
    ("override", "says"),
    [
        (
            "backbone.weights_path=/nonexistent.pth",
            "backbone.weights_path=/nonexistent.pth: file not found",
        ),
        ("head.dropout=1.5", "dropout=1.5 must be in [0, 1)"),
        ("trainer.devices=0", "devices=0"),
        ("trainer.precision=7", "trainer.precision=7: Precision 7 is invalid"),
        (
            "trainer.strategy=bogus",
            "trainer.strategy='bogus': You selected an invalid strategy name",
        ),
        ("dataset.batch_size=0", "dataset.batch_size=0 must be an integer >= 1"),
        ("dataset.batch_size=-1", "dataset.batch_size=-1 must be an integer >= 1"),
        ("optimizer.lr=-1", "lr=-1 must be > 0"),
        ("optimizer.weight_decay=-1", "weight_decay=-1 must be >= 0"),
        ("dataset.num_workers=-1", "dataset.num_workers=-1 must be an integer >= 0"),
        ("seed=abc", "seed='abc' must be an integer"),
        ("label_smoothing=2", "label_smoothing=2 must be in [0, 1)"),
        ("trainer.max_epochs=-1", "trainer.max_epochs=-1 must be an integer >= 1"),
        ("dataset.val_fraction=abc", "dataset.val_fraction='abc' must be a number between 0 and 1"),
        ("dataset.image_size=0", "dataset.image_size=0 must be in [16, 1024]"),
        ("dataset.image_size=100000", "dataset.image_size=100000 must be in [16, 1024]"),
        ("dataset.augment=heavy", "dataset.augment='heavy' must be light or none"),
        ("scheduler.warmup_epochs=-1", "scheduler.warmup_epochs=-1 must be >= 0"),
        (
            "+trainer.max_epoch=1",
            "trainer.max_epoch is not an argument of pytorch_lightning.Trainer",
        ),
    ],
)
def test_bad_values_fail_before_any_work_naming_key_and_range(override, says):
    assert says in check(override)


def test_mlp_hidden_zero_is_refused():
    assert "hidden=0 must be >= 1" in check("head=mlp", "head.hidden=0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_accelerator_on_a_cpu_machine_says_why():
    msg = check("trainer.accelerator=gpu")
    assert msg.startswith("trainer.accelerator='gpu': ") and "gpu" in msg.split(": ", 1)[1].lower()


def test_backbone_errors_keep_their_reason(tiny_cfg, tmp_path: Path, monkeypatch):
    from tl_cli.commands.train import run

    monkeypatch.setenv(
        "TORCH_HOME", str(tmp_path / "torch")
    )  # nothing cached: a download is needed
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TLError, match="nonexistent_model"):
        run(tiny_cfg("backbone.name=nonexistent_model"))


def test_offline_download_line_reaches_the_user(tiny_data: Path, tmp_path: Path, monkeypatch):
    from tl_cli.commands.train import run

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = compose_cfg(
        [
            *(o for o in TINY if not o.startswith("backbone")),
            "backbone=resnet18",
            f"dataset.root={tiny_data}",
        ]
    )
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "run")
    try:
        import socket

        socket.create_connection(("download.pytorch.org", 443), timeout=3).close()
        pytest.skip("the network is up: nothing to refuse")
    except OSError:
        pass
    with pytest.raises(TLError, match="cannot download pretrained weights .* Put the file at"):
        run(cfg)


# ----------------------------------------------------------------------------- error analysis


def test_eval_writes_error_analysis(good_ckpt: Path, tmp_path: Path, capsys):
    import csv

    from PIL import Image

    from tl_cli.commands.evaluate import run as evaluate

    cfg = compose_cfg([f"checkpoint={good_ckpt}"], "eval")
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "ev")
    res = evaluate(cfg)
    rows = list(csv.DictReader(open(tmp_path / "ev/misclassified.csv")))
    wrong = round((1 - res["acc"]) * res["num_samples"])
    assert len(rows) == wrong
    assert (
        list(rows[0]) == ["input", "true", "predicted", "predicted_prob", "true_prob", "loss"]
        if rows
        else True
    )
    for r in rows:
        assert Path(r["input"]).is_file() and r["true"] != r["predicted"]
        assert float(r["predicted_prob"]) >= float(r["true_prob"])
    assert [float(r["loss"]) for r in rows] == sorted(
        (float(r["loss"]) for r in rows), reverse=True
    )
    with Image.open(tmp_path / "ev/top_losses.png") as im:
        assert im.size[0] > 200
    # report.md links both (issue 29: they were written but not linked)
    md = (tmp_path / "ev/report.md").read_text()
    assert "[misclassified.csv](misclassified.csv)" in md and "](top_losses.png)" in md
    out = capsys.readouterr().out
    assert "most confused (true -> predicted):" in out
    assert not list((tmp_path / "ev").glob(".*.tmp"))


def test_most_confused_pairs():
    from tl_cli.tasks.classification.evaluation import most_confused

    cm = [[5, 2, 0], [0, 4, 3], [1, 0, 6]]
    assert most_confused(cm, ["a", "b", "c"], k=2) == [("b", "c", 3), ("a", "b", 2)]


# ----------------------------------------------------------------------------- sweeps


def test_sweep_jobs_share_the_feature_cache(tiny_data: Path, tmp_path: Path):
    """Jobs with the same backbone, preprocessing and data reuse the first job's features.

    (With ``backbone.weights=none`` the random init follows ``seed``, so a seed sweep would change
    the backbone; a sweep over the head's LR keeps it.)
    """
    r = run_tl(
        "train",
        "-m",
        *TINY,
        f"dataset.root={tiny_data}",
        "trainer.max_epochs=1",
        "optimizer.lr=1e-3,1e-2",
        f"hydra.sweep.dir={tmp_path / 'sw'}",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("feature cache")]
    assert lines == [
        f"feature cache {tmp_path / 'sw/feature_cache'}: 0 hit(s), 3 computed",
        f"feature cache {tmp_path / 'sw/feature_cache'}: 3 hit(s), 0 computed",
    ]


# ----------------------------------------------------------------------------- run dirs, checkpoints, data


@pytest.mark.parametrize("kind", ["file", "devnull", "under_a_file", "read_only"])
def test_unusable_run_dir_is_one_line(kind: str, tmp_path: Path, monkeypatch):
    f = tmp_path / "afile"
    f.write_text("x")
    target = {
        "file": f,
        "devnull": Path("/dev/null"),
        "under_a_file": f / "run",
        "read_only": tmp_path / "ro" / "run",
    }[kind]
    if kind == "read_only":
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
        if os.access(tmp_path / "ro", os.W_OK):  # root ignores modes: act as a read-only mount
            real = os.access
            monkeypatch.setattr(
                os, "access", lambda p, m: False if Path(p) == tmp_path / "ro" else real(p, m)
            )
    msg = preflight_error("train", f"hydra.run.dir={target}")
    assert msg.startswith(f"hydra.run.dir={target}")


def _malformed(good_ckpt: Path, tmp_path: Path, edit) -> Path:
    ckpt = torch.load(good_ckpt, weights_only=True)
    edit(ckpt)
    p = tmp_path / "bad.ckpt"
    torch.save(ckpt, p)
    return p


def _set_names(ckpt, names):
    ckpt["hyper_parameters"]["class_names"] = names
    ckpt["tl"]["class_names"] = names


def _reshape_head(ckpt):
    sd = ckpt["state_dict"]
    k = next(k for k in sd if k.startswith("head") and k.endswith("weight"))
    sd[k] = torch.zeros(sd[k].shape[0] + 1, sd[k].shape[1])


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda c: _set_names(c, []), "class_names must be 2 or more distinct names"),
        (
            lambda c: c["tl"].__setitem__("class_names", ["x", "y", "z"]),
            "tl.class_names and hyper_parameters.class_names disagree",
        ),
        (lambda c: c["tl"].pop("preprocessing"), "tl.preprocessing is missing"),
        (
            lambda c: c["hyper_parameters"].__setitem__("surprise", 1),
            "hyper_parameters.surprise is not a key tl writes",
        ),
        (_reshape_head, "weights do not fit the model"),
        (lambda c: c["tl"]["preprocessing"].pop("mean"), "tl.preprocessing"),
    ],
)
def test_malformed_checkpoint_exits_2_with_the_reason(good_ckpt: Path, tmp_path: Path, edit, says):
    from tl_cli.commands.evaluate import run as evaluate

    bad = _malformed(good_ckpt, tmp_path, edit)
    cfg = compose_cfg([f"checkpoint={bad}"], "eval")
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "ev")
    with pytest.raises(TLError) as e:
        evaluate(cfg)
    assert e.value.exit_code == 2
    assert says in str(e.value)


def test_dangling_symlink_is_counted_with_skipped_files(tmp_path: Path):
    from tests.conftest import make_image_folder
    from tl_cli.data.base import DATASETS

    root = make_image_folder(tmp_path / "d", {"": 4})
    (root / "cat" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    dm = DATASETS.build({"name": "imagefolder", "root": str(root), "num_workers": 0})
    with pytest.raises(TLError, match="gone.png: dangling symlink"):
        dm.prepare()
    dm = DATASETS.build(
        {"name": "imagefolder", "root": str(root), "num_workers": 0, "skip_corrupt": True}
    )
    dm.prepare()
    assert [Path(b.path).name for b in dm.skipped_corrupt] == ["gone.png"]


def test_backbones_listing_never_wraps_the_override(monkeypatch, capsys):
    from rich.console import Console

    from tl_cli.commands.backbones import main as list_backbones
    from tl_cli.core import console as tl_console

    monkeypatch.setattr(tl_console, "console", Console(width=80, soft_wrap=True, highlight=False))
    assert list_backbones(["efficientnet_lite"]) == 0
    out = capsys.readouterr().out
    assert "backbone=efficientnet_lite0" in out.replace("│", " ").split()


# ----------------------------------------------------------------------------- what the console keeps


def test_first_run_of_a_newcomer(tiny_data: Path, tmp_path: Path):
    """`~` and dataset.root alone work; the log file holds the console; epochs from 1; next step."""
    import csv
    import json

    home = tmp_path / "home"
    home.mkdir()
    (home / "data").symlink_to(tiny_data)
    run = tmp_path / "run"
    tiny = [o for o in TINY if o != "dataset=imagefolder"]
    r = run_tl(
        "train",
        *tiny,
        "dataset.root=~/data",
        "strategy=freeze_unfreeze",
        "strategy.unfreeze_at_epoch=1",
        f"hydra.run.dir={run}",
        env={"HOME": str(home)},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert out.splitlines()[1] == f"tl train: {run}"  # a first line before the slow imports
    assert "using dataset=imagefolder" in out and "data imagefolder: 3 classes" in out
    assert "epoch 1/2  train/loss" in out and "epoch 2/2  train/loss" in out
    assert "epoch 2: unfreezing backbone block group(s)" in out
    assert f"next: tl eval checkpoint={run / 'checkpoints/best.ckpt'}" in out
    assert f"report: {run / 'report.md'}" in out
    assert (
        "1 batches" not in out
        and "fit_seconds" in out
        and "0000 " not in out.split("fit_seconds")[1][:20]
    )
    log = (run / "train.log").read_text()
    for line in ("epoch 1/2", "epoch 2: unfreezing", "val/acc", "next: tl eval"):
        assert line in log
    m = json.loads((run / "metrics.json").read_text())
    assert m["unfreeze_epochs"] and m["unfreeze_epochs"][0]["epoch"] == 2
    assert m["history"][1]["unfrozen"] and "lr" in m["history"][0]
    header = next(csv.reader(open(run / "csv/metrics.csv")))
    assert any(h.startswith("lr-") for h in header)


def test_eval_log_is_not_empty(good_ckpt: Path, tmp_path: Path):
    r = run_tl("eval", f"checkpoint={good_ckpt}", f"hydra.run.dir={tmp_path / 'ev'}")
    assert r.returncode == 0, r.stderr[-2000:]
    log = (tmp_path / "ev/eval.log").read_text()
    assert "per class" in log and "misclassified" in log

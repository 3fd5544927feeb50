"""Texts in `tl predict` and `tl export`: lines, files or a table; token ids and masks as graph inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tl_cli.core.console import say
from tl_cli.core.errors import TLError
from tl_cli.modalities.base import MODALITIES, Modality
from tl_cli.modalities.text.files import TEXT_EXTS, read_table, read_text_lines
from tl_cli.modalities.text.tokenizer import (
    encode,
    get_tokenizer,
    pad_batch,
    rust_errors,
    tokenizer_for,
)


@MODALITIES.register("text")
class TextModality(Modality):
    """Texts: ``input_ids`` and ``attention_mask`` (int64, padded per batch) from the checkpoint's
    own tokenizer; ``inputs=`` is a .csv/.tsv/.jsonl file with a ``text`` column, a .txt file with
    one text per line, or a list of those."""

    name = "text"
    noun = "texts"
    item_column = "text"  # predictions show the text itself, not a file path
    folder_dataset = "text"
    text_column = "text"

    def _files(self, inputs: Any) -> list[Path]:
        from tl_cli.data.inputs import input_files, input_specs

        out = input_files(inputs, "text inputs are .csv/.tsv/.jsonl/.txt files")
        for spec, p in zip(input_specs(inputs), out, strict=True):
            if p.suffix.lower() not in (*TEXT_EXTS, ".txt"):
                raise TLError(
                    f"inputs={spec}: not a text file; give a {', '.join(TEXT_EXTS)} file with a "
                    f"'{self.text_column}' column, or a .txt file with one text per line"
                )
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

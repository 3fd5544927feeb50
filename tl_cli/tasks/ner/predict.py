"""``tl predict`` for NER: entities with character offsets, as JSONL (default) or CoNLL.

Inputs (``inputs=FILE`` or a list): plain text lines (``.txt``; words split off punctuation as in
CoNLL files), or CoNLL/JSONL sentences (their tags, if any, kept as gold). One JSONL object per
input sentence: ``{"text": ..., "entities": [{"text", "type", "start", "end", "score"}]}`` with
character offsets into ``text``; ``output=X.conll`` writes ``token<TAB>tag`` lines instead
(``token<TAB>gold<TAB>predicted`` when the input had tags), in the training data's tag scheme.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tl_cli.core.console import say
from tl_cli.core.errors import TLError
from tl_cli.core.outputs import atomic_file
from tl_cli.modalities.text.tokenizer import get_tokenizer
from tl_cli.tasks.base import Predictor
from tl_cli.tasks.ner import io
from tl_cli.tasks.ner.align import (
    Aligner,
    TokenCollate,
    TokenDataset,
    gather_words,
    merge,
    split_by_sentence,
    word_offsets,
)
from tl_cli.tasks.ner.model import entities, in_scheme, word_tags

#: windows overlap by this share of a window when the checkpoint does not say
STRIDE_FRACTION = 0.25


class NerPredictor(Predictor):
    """Sentences in, entities out (see the module docstring)."""

    formats = ("jsonl", "conll")

    def __init__(self, module: Any, modality: Any, prep: dict[str, Any], cfg: Any) -> None:
        super().__init__(module, modality, prep, cfg)
        n = int(prep["max_length"])
        stride = module.stride if module.stride is not None else int(n * STRIDE_FRACTION)
        self.aligner = Aligner(get_tokenizer(prep), n, stride)
        self.collate_windows = TokenCollate(int(prep["pad_id"]))
        self.labels = list(module.class_names)
        self.scheme = module.tag_scheme
        self._files: list[Path] = []

    @property
    def noun(self) -> str:
        return "sentences"

    def _paths(self, inputs: Any) -> list[Path]:
        from tl_cli.data.inputs import input_files

        return input_files(inputs, f"NER inputs are .txt lines or {', '.join(io.NER_EXTS)} files")

    def find(self, inputs: Any) -> list[Any]:
        items = []
        for p in self._paths(inputs):
            got, skipped = io.read_predict_inputs(p)
            if skipped:
                say(f"{p}: skipped {skipped} empty line(s)")
            if not got:
                raise TLError(f"inputs={p}: no sentences in this file")
            items.extend((f"{p}:{i + 1}", inp) for i, inp in enumerate(got))
        return items

    def item_name(self, item: Any) -> str:
        return item[0]

    def protected(self, inputs: Any, items: list[Any]) -> list[str]:
        return [str(p) for p in self._paths(inputs)]

    def load(self) -> Any:
        def read(item: Any) -> tuple[io.PredictInput, Any]:
            inp = item[1]
            wins, _ = self.aligner.windows([inp.words])
            return inp, wins

        return read

    def collate(self, inputs: list[Any]) -> Any:
        sents = [inp for inp, _ in inputs]
        wins = []
        for k, (_, ws) in enumerate(inputs):
            for w in ws:
                w.sentence = k
                wins.append(w)
        words = [s.words for s in sents]
        ds = TokenDataset(wins, None, word_offsets(words))
        x, y = self.collate_windows([ds[i] for i in range(len(ds))])
        return {"x": x, "word_index": y["word_index"], "inputs": sents}

    def forward(self, batch: Any) -> Any:
        logits = self.module(batch["x"]).float().cpu()
        idx, rows = gather_words(logits, batch["word_index"].cpu())
        lengths = [len(s.words) for s in batch["inputs"]]
        per_word = merge([idx], [rows], sum(lengths))
        return {"inputs": batch["inputs"], "logits": per_word, "lengths": lengths}

    def nonfinite(self, outputs: Any) -> int | None:
        bad = (~torch.isfinite(outputs["logits"]).all(dim=1)).tolist()
        for k, b in enumerate(split_by_sentence(bad, outputs["lengths"])):
            if any(b):
                return k
        return None

    def postprocess(self, outputs: Any) -> list[Any]:
        tags, probs = word_tags(outputs["logits"], self.labels)
        out = []
        for inp, t, p in zip(
            outputs["inputs"],
            split_by_sentence(tags, outputs["lengths"]),
            split_by_sentence(probs, outputs["lengths"]),
            strict=True,
        ):
            out.append(
                {
                    "text": inp.text,
                    "entities": entities(inp, t, p),
                    "words": inp.words,
                    "tags": in_scheme(t, self.scheme),
                    "gold": inp.gold,
                }
            )
        return out

    def write(self, path: Path, rows: list[dict[str, Any]], fmt: str) -> None:
        with atomic_file(path, "w", encoding="utf-8", newline="\n") as fh:
            for r in rows:
                res = r["result"]
                if fmt == "conll":
                    if res is None:
                        continue
                    for i, (w, t) in enumerate(zip(res["words"], res["tags"], strict=True)):
                        cols = [w, res["gold"][i], t] if res["gold"] else [w, t]
                        fh.write("\t".join(cols) + "\n")
                    fh.write("\n")
                    continue
                obj: dict[str, Any] = (
                    {"text": res["text"], "entities": res["entities"]} if res else {"text": None}
                )
                if r["error"]:
                    obj["error"] = r["error"]
                fh.write(json.dumps(obj, ensure_ascii=False) + "\n")

    def show(self, rows: list[dict[str, Any]], limit: int = 20) -> None:
        from rich.markup import escape
        from rich.table import Table

        from tl_cli.core.console import console

        more = f", first {limit}" if len(rows) > limit else ""
        t = Table(title=f"entities ({len(rows)} sentences{more})", header_style="bold")
        t.add_column("sentence")
        t.add_column("entities")
        for r in rows[:limit]:
            res = r["result"]
            text = res["text"] if res else r["path"]
            text = text if len(text) <= 60 else text[:57] + "..."
            ents = (
                ", ".join(f"{e['text']} ({e['type']} {e['score']:.2f})" for e in res["entities"])
                if res
                else f"[red]error[/] {escape(str(r['error'])[:60])}"
            )
            t.add_row(escape(text), escape(ents) if res else ents)
        console.print(t)

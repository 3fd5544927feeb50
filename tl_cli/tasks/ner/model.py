"""The token-classification model pieces: head, loss, word predictions and entity output.

``TokenTagger`` = a text backbone's per-token hidden states (``TextBackbone.token_features``)
-> dropout -> linear layer over the tag list: Hugging Face's ``*ForTokenClassification`` head.
Its forward takes the same ``{"input_ids", "attention_mask"}`` dict as the backbone and returns
token logits ``(B, T, tags)``: what export writes (dynamic batch and token axes).

Predictions: each word's tag is the arg-max at its first sub-token; spans are decoded from the
word tags with the conlleval rules (``tl_cli.tasks.ner.schemes.decode``), the rules seqeval scores
with; an entity's ``score`` is the mean probability of its words' predicted tags.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tl_cli.tasks.ner.align import IGNORE
from tl_cli.tasks.ner.io import PredictInput
from tl_cli.tasks.ner.schemes import decode, encode


class TokenHead(nn.Module):
    """Dropout then a linear layer on every token's hidden state."""

    def __init__(self, in_features: int, num_tags: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(float(dropout))
        self.linear = nn.Linear(int(in_features), int(num_tags))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(h))


class TokenTagger(nn.Module):
    """Backbone (with ``token_features``) + a head: token logits ``(B, T, tags)``.

    ``pack`` (the text modality's, for export) turns the graph's input tensors
    ``(input_ids, attention_mask)`` into the dict the backbone takes; without it the forward
    takes that dict.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, pack: Any = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.pack = pack

    def forward(self, *xs: Any) -> torch.Tensor:
        x = self.pack(*xs) if self.pack is not None else xs[0]
        return self.head(self.backbone.token_features(x))


def token_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean cross-entropy over the positions that carry a label (``-100`` elsewhere); zero, with
    a graph, for a batch without any (cross_entropy would return NaN)."""
    flat, y = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    if not bool((y != IGNORE).any()):
        return flat.sum() * 0.0
    return F.cross_entropy(flat, y, ignore_index=IGNORE, label_smoothing=label_smoothing)


def word_tags(word_logits: torch.Tensor, labels: Sequence[str]) -> tuple[list[str], list[float]]:
    """Arg-max tag and its probability for each word's row of logits."""
    probs = word_logits.float().softmax(-1)
    p, i = probs.max(-1)
    return [labels[k] for k in i.tolist()], p.tolist()


def entities(
    inp: PredictInput, tags: Sequence[str], probs: Sequence[float]
) -> list[dict[str, Any]]:
    """``[{"text", "type", "start", "end", "score"}]`` with character offsets into ``inp.text``."""
    out = []
    for s, e, t in decode(tags):
        start, end = inp.offsets[s][0], inp.offsets[e - 1][1]
        out.append(
            {
                "text": inp.text[start:end],
                "type": t,
                "start": int(start),
                "end": int(end),
                "score": round(float(sum(probs[s:e]) / (e - s)), 4),
            }
        )
    return out


def prediction(inp: PredictInput, tags: Sequence[str], probs: Sequence[float]) -> dict[str, Any]:
    """One JSONL object of ``tl predict``."""
    return {"text": inp.text, "entities": entities(inp, tags, probs)}


def in_scheme(tags: Sequence[str], scheme: str) -> list[str]:
    """Predicted (internal) tags written in the data's own scheme (CoNLL output)."""
    return encode(decode(tags), len(tags), scheme)

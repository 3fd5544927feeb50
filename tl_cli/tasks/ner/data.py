"""``dataset=ner``: CoNLL/JSONL sentences as windows of sub-tokens for a text backbone.

The splits hold :class:`~tl_cli.tasks.ner.io.Sentence` lists with tags in the internal (BIO)
scheme; ``class_names`` is the internal tag list (the head's outputs). ``dataset(split)`` cuts
the sentences into windows (``tl_cli.tasks.ner.align``) with the backbone's own tokenizer;
training batches group windows of similar length (Hugging Face's ``group_by_length``), which
keeps padding, and so time, low without changing what is learned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tl_cli.core.console import say, warn
from tl_cli.core.errors import TLError
from tl_cli.data.base import DATASETS, EpochShuffle, TransferDataModule
from tl_cli.modalities.text.backbone import effective_text_preprocessing
from tl_cli.modalities.text.tokenizer import get_tokenizer
from tl_cli.tasks.ner import io
from tl_cli.tasks.ner.align import Aligner, AlignStats, TokenCollate, TokenDataset, word_offsets

#: sub-tokens shared by consecutive windows of a long sentence, as a share of the window
STRIDE_FRACTION = 0.25


class LengthGrouped(EpochShuffle):
    """A shuffle whose consecutive ``batch_size`` runs hold windows of similar length.

    As Hugging Face's ``group_by_length``: shuffle, sort each mega-batch of 50 batches by length,
    cut it into batches and shuffle the batches (a short last batch stays last, so the loader's
    batches are exactly these). A pure function of (seed, epoch), as :class:`EpochShuffle`.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int | None = None, mega: int = 50
    ) -> None:
        super().__init__(len(lengths), seed)
        self.lengths = list(lengths)
        self.batch_size = int(batch_size)
        self.mega = int(mega) * self.batch_size

    def __iter__(self):
        g = self.generator()
        order = torch.randperm(self.n, generator=g).tolist()
        groups = [
            sorted(order[m : m + self.mega], key=lambda i: -self.lengths[i])
            for m in range(0, self.n, self.mega)
        ]
        flat = [i for grp in groups for i in grp]
        bs = self.batch_size
        batches = [flat[b : b + bs] for b in range(0, len(flat), bs)]
        last = batches.pop() if batches and len(batches[-1]) < bs else None
        perm = torch.randperm(len(batches), generator=g).tolist()
        out = [i for k in perm for i in batches[k]]
        return iter(out + (last or []))


class NerDataModule(TransferDataModule):
    """Sentences with entity tags. ``root`` is a CoNLL/JSONL file (val and test carved by
    sentence) or a directory with ``train.*`` (+ ``dev.*``/``val.*``, + ``test.*``).

    Args:
        tag_scheme: ``auto`` (detected from train) or bio/iob2, iob1, io, bioes/iobes, bilou.
        max_length: sub-tokens per window, special tokens included (default: the model's).
        stride: sub-tokens shared by consecutive windows (default: a quarter of a window).
        test_fraction: share of sentences carved as test from a single file.
        group_by_length: training batches of windows of similar length.
        carve: False (``tl eval dataset.root=OTHER``): a single file is scored whole.
    """

    item_noun = "sentences"
    name = "ner"
    #: ``tl eval dataset.root=OTHER`` reads OTHER with this module (not the text modality's)
    reads_any_root = True

    def __init__(
        self,
        root: str | None = None,
        tag_scheme: str = "auto",
        max_length: int | None = None,
        stride: int | None = None,
        test_fraction: float = 0.2,
        group_by_length: bool = True,
        carve: bool = True,
        augment: str = "none",
        **kw: Any,
    ) -> None:
        kw.pop("image_size", None)
        super().__init__(augment=augment, **kw)
        io.schemes.scheme_name(tag_scheme)  # a bad value fails before any reading
        if self.balance:
            raise TLError(
                f"dataset.balance={self.balance} balances classes of whole inputs; a NER sentence "
                "holds many tags (leave dataset.balance unset)"
            )
        if stride is not None and (not isinstance(stride, int) or stride < 0):
            raise TLError(f"dataset.stride={stride!r} must be an integer >= 0 (or null)")
        self.root = root
        self.tag_scheme = str(tag_scheme)
        self.max_length = max_length
        self.stride = stride
        self.test_fraction = test_fraction
        self.group_by_length = bool(group_by_length)
        self.carve = bool(carve)
        self.data: io.NerData | None = None
        self.aligner: Aligner | None = None
        self._datasets: dict[tuple[str, bool], TokenDataset] = {}
        self.align_stats: dict[str, AlignStats] = {}

    # -- scanning
    def _scan(self) -> None:
        self.data = io.load(
            self.root,
            self.tag_scheme,
            self.val_fraction,
            self.test_fraction,
            self.split_seed,
            self.carve,
        )
        for w in self.data.warnings:
            warn(w)
        self.layout = self.data.layout
        self.class_names = list(self.data.labels)
        # (sentence, -1): the (item, label) pairs every data module holds; a sentence has no one
        # class (its tags are in the sentence), so the label is -1, "none" (class counts skip it)
        self.splits = {k: [(s, -1) for s in v] for k, v in self.data.splits.items()}

    def sentences(self, split: str) -> list[io.Sentence]:
        self.prepare()
        return [s for s, _ in self.splits[split]]

    @property
    def entity_types(self) -> list[str]:
        self.prepare()
        assert self.data is not None
        return list(self.data.types)

    @property
    def source_scheme(self) -> str:
        self.prepare()
        assert self.data is not None
        return self.data.source_scheme

    # -- preprocessing
    def preprocessing_overrides(self) -> dict[str, Any]:
        return {"max_length": int(self.max_length)} if self.max_length else {}

    def set_preprocessing(self, prep: dict[str, Any]) -> None:
        if prep.get("modality") != "text":
            raise TLError(
                "task=ner needs a text backbone (backbone=minilm or backbone=hf); "
                f"this one reads {prep.get('modality', 'images')}"
            )
        self.preprocessing = effective_text_preprocessing(prep, self.max_length)
        n = int(self.preprocessing["max_length"])
        stride = int(n * STRIDE_FRACTION) if self.stride is None else int(self.stride)
        self.aligner = Aligner(get_tokenizer(self.preprocessing), n, stride)
        self._datasets.clear()

    # -- datasets and loaders
    def dataset(self, split: str, train_aug: bool | None = None) -> TokenDataset:
        """Windows of ``split``; ``train_aug`` (default: split is train) labels every word of
        every window, otherwise each word is labelled once, in the window that scores it."""
        self.prepare()
        if self.aligner is None:
            raise RuntimeError("set_preprocessing() must be called before building datasets")
        if split not in self.splits:
            raise TLError(f"dataset has no {split!r} split (available: {', '.join(self.splits)})")
        train = split == "train" if train_aug is None else bool(train_aug)
        key = (split, train)
        if key not in self._datasets:
            sents = self.sentences(split)
            words = [s.tokens for s in sents]
            if split not in self.align_stats:
                wins, stats = self.aligner.windows(words)
                self.align_stats[split] = stats
                for note in stats.notes(self.aligner.room):
                    say(f"{split}: {note}")
            else:
                wins, _ = self.aligner.windows(words)
            lid = {t: i for i, t in enumerate(self.class_names)}
            tags = [[lid[t] if t in lid else 0 for t in s.tags] for s in sents]
            self._datasets[key] = TokenDataset(
                wins, tags, word_offsets(words), train, words, [s.tags for s in sents]
            )
        return self._datasets[key]

    def make_loader(
        self, ds: Any, shuffle: bool, collate_fn: Any = None
    ) -> torch.utils.data.DataLoader:
        if not (shuffle and self.group_by_length and isinstance(ds, TokenDataset)):
            return super().make_loader(ds, shuffle, collate_fn)
        return torch.utils.data.DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=LengthGrouped(ds.lengths(), self.batch_size),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_fn or self.collate_fn(ds),
        )

    def collate_fn(self, ds: Any = None) -> TokenCollate:
        assert self.preprocessing is not None
        return TokenCollate(self.preprocessing["pad_id"])

    def gold(self, split: str) -> list[list[str]]:
        """The internal tags of ``split`` (what predictions are scored against)."""
        return [list(s.tags) for s in self.sentences(split)]

    def words(self, split: str) -> list[list[str]]:
        return [list(s.tokens) for s in self.sentences(split)]

    def describe(self) -> str:
        self.prepare()
        assert self.data is not None
        return self.data.describe()


DATASETS.register("ner", NerDataModule)

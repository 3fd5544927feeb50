"""Named-entity recognition (``task=ner``): token classification on a text backbone.

``schemes`` (tag schemes, conlleval span decoding), ``io`` (CoNLL/JSONL readers, splits, predict
inputs, CoNLL writer), ``align`` (first-sub-token labels, overlapping windows, merging window
predictions per word), ``metrics`` (seqeval scores, type confusion, error analysis), ``model``
(token head pieces, loss, entity output), ``infer`` (tagging sentences, eval report), ``data``
(``dataset=ner``), ``task`` (``NerTask``), ``predict`` (``NerPredictor``). docs/ner.md.
"""

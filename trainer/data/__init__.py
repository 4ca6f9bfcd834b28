"""Data: read through `datasets`, detect the format, render chat, tokenize with label masks, split, pack, cache.

Every tokenized sample carries `input_ids`, `labels` (-100 where no loss), `sample_id` (a running index over
samples, so tests can check each sample is seen once), `row` (its row in the source file) and its length.
Packed rows carry several samples with `position_ids` restarting at 0 at each sample start: transformers turns
restarts into a block-diagonal causal mask when `attention_mask` is None, so samples never attend across a
boundary in architectures that honour it (checked on the model before training: `trainer/packing_check.py`).
Padding is handled the same way (a block of its own, labels -100): masked by position, never by token id.

Modules, in the order data flows: `reading` (files -> rows), `formats` (row -> conversation), `tokenize`
(conversation -> ids and labels), `packing` (samples -> rows), `pipeline` (split, cache, the whole step),
`batching` (rows -> tensors, used by the loop).
"""

from trainer.data.batching import collate, count_targets
from trainer.data.formats import detect_format, row_to_messages
from trainer.data.packing import as_rows, pack, pack_lengths, unpack
from trainer.data.pipeline import PreparedData, describe, prepare_data, split_indices
from trainer.data.reading import data_files, read_rows
from trainer.data.tokenize import IGNORE, prepare_messages, render, reply_spans, tokenize_sample, tokenize_text

__all__ = [
    "prepare_data",
    "PreparedData",
    "describe",
    "split_indices",
    "collate",
    "count_targets",
    "pack_lengths",
    "pack",
    "as_rows",
    "unpack",
    "tokenize_sample",
    "tokenize_text",
    "prepare_messages",
    "reply_spans",
    "render",
    "row_to_messages",
    "detect_format",
    "read_rows",
    "data_files",
    "IGNORE",
]

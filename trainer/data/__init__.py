"""Data: read through `datasets`, detect the format, render chat, tokenize with label masks, split, mix, pack, cache.

Every tokenized sample carries `input_ids`, `labels` (-100 where no loss), its length, and a `sample_id` (a
running index over all samples of all datasets, stable for a given data and recipe; `index.npy` in the cache gives
each sample's source file and row, `PreparedData.source_rows` reads it). A row of data can give several samples
(a template that rewrites earlier turns, `data.rewritten_turns: separate`). Packed rows carry several samples with
`position_ids` restarting at 0 at each sample start: transformers turns restarts into a block-diagonal causal mask
when `attention_mask` is None, so samples never attend across a boundary in architectures that honour it (checked
on the model before training: `trainer/packing_check.py`).
Padding is handled the same way (a block of its own, labels -100): masked by position, never by token id.

Modules, in the order data flows: `reading` (files -> rows), `formats` (row -> conversation), `tokenize`
(conversation -> ids and labels), `packing` (samples -> rows), `pipeline` (split, mix, cache, the whole step),
`batching` (rows -> tensors, used by the loop).
"""

from trainer.data.batching import collate, count_targets
from trainer.data.formats import detect_format, row_to_messages
from trainer.data.packing import as_rows, pack, pack_lengths, unpack
from trainer.data.pipeline import (
    PreparedData,
    cache_key,
    dataset_specs,
    describe,
    prepare_data,
    sample_conversations,
    split_indices,
)
from trainer.data.reading import data_files
from trainer.data.tokenize import IGNORE, prepare_messages, render, reply_spans, tokenize_sample, tokenize_text

__all__ = [
    "prepare_data",
    "PreparedData",
    "describe",
    "split_indices",
    "dataset_specs",
    "cache_key",
    "sample_conversations",
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
    "data_files",
    "IGNORE",
]

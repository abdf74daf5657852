"""Data: the embedded easy-VQA data set, its caption corpus, tokenizers and datasets.

Submodules: :mod:`engine.data.easyvqa` (loading and caching easy-VQA, deriving
captions; numpy only), :mod:`engine.data.tokenizer` (word-level tokenizer,
loading pretrained ones) and :mod:`engine.data.datasets` (in-memory torch
datasets for the training loop). Importing this package imports none of them.
"""

"""Command-line entry points installed as console scripts (see setup.py):

* `preprocess_data`: ``megatron-moh-preprocess``, txt/jsonl -> megatron ``.bin``/``.idx``;
* `train_tokenizer`: ``megatron-moh-train-tokenizer``, a byte-fallback BPE sentencepiece model.

``tools/preprocess_data.py`` and ``tools/train_tokenizer.py`` run the same ``main()``.
"""

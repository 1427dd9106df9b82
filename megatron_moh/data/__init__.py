"""Text in, megatron-core GPT datasets out; one module per job:

* `corpus`: the built-in corpus (Python's stdlib docstrings), cached as tokenizer + dataset, and
  ``pretrain_moh.py`` arguments that train on it (`use_builtin_data`);
* `preprocess`: read txt/jsonl documents and tokenize them into megatron's ``.bin``/``.idx``;
* `validation`: `DataError` and the one-line checks of blends, splits and datasets on disk;
* `datasets`: train/valid/test datasets from megatron-core's builder (`build_gpt_datasets`).

Megatron and torch are imported inside the functions that need them, so tokenizer training and
the preprocessing workers start without the ~8 s megatron import.
"""

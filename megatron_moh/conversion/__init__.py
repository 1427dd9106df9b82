"""Converting megatron-moh checkpoints, to and from Hugging Face.

* `weights`: megatron <-> Hugging Face state-dict maps (pure functions on whole state dicts);
* `hf_configs`: megatron configs <-> Llama / MoH-Llama configs, MoH layouts for imports;
* `hf_files`: reading and writing Hugging Face checkpoint directories;
* `whole_model`: a checkpoint saved at any TP/PP as one model in one process;
* `hf_checkpoint`: megatron checkpoint -> Hugging Face directory and back (`export_hf`,
  `import_hf`), the work behind ``tools/convert_checkpoint.py``.
"""


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted; the message says what to change."""

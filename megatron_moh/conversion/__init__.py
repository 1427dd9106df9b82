"""Converting megatron-moh checkpoints, to and from Hugging Face.

* `weights`: megatron <-> Hugging Face weight maps, one tensor at a time (the whole-state-dict maps
  are loops over them);
* `hf_configs`: megatron configs <-> Llama / MoH-Llama configs, MoH layouts for imports;
* `safetensors_io`: safetensors headers, single tensors by offset, a writer fed tensor by tensor;
* `hf_files`: reading and writing Hugging Face checkpoint directories (the one reader and writer);
* `megatron_files`: megatron torch_dist checkpoints one tensor at a time (a save that makes each
  tensor when it is written, a load of a few tensors);
* `whole_model`: a checkpoint saved at any TP/PP as one model in one process, or on the meta device;
* `hf_checkpoint`: megatron checkpoint -> Hugging Face directory and back (`export_hf`,
  `import_hf`), the work behind ``tools/convert_checkpoint.py``, with memory that does not grow with
  the model.
"""


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted; the message says what to change."""

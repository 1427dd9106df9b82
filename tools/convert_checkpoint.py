"""Convert between megatron-moh checkpoints and Hugging Face directories (megatron_moh.commands.convert_checkpoint)."""

from megatron_moh.commands.convert_checkpoint import main

if __name__ == "__main__":
    main()

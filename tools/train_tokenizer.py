"""``megatron-moh-train-tokenizer`` as a script; see megatron_moh/commands/train_tokenizer.py."""
from megatron_moh.commands.train_tokenizer import main

if __name__ == "__main__":
    raise SystemExit(main())

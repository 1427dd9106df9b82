"""``megatron-moh-preprocess`` as a script; see megatron_moh/commands/preprocess_data.py."""
from megatron_moh.commands.preprocess_data import main

if __name__ == "__main__":
    raise SystemExit(main())

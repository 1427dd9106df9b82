"""Which heads a trained MoH model routes to, on which data (see megatron_moh.commands.analyze_heads)."""

from megatron_moh.commands.analyze_heads import main

if __name__ == "__main__":
    main()

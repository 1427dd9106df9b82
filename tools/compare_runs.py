"""Compare training runs from their TensorBoard logs (see megatron_moh.commands.compare_runs)."""

from megatron_moh.commands.compare_runs import main

if __name__ == "__main__":
    main()

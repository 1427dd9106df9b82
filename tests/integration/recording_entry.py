"""pretrain_moh.py for torchrun tests that compare runs: the same main(), and one line per training
micro-batch with its exact loss, ``exact loss: rank R iteration I VALUE`` (I counted from 1, as
megatron logs). megatron's own log line is rounded, and its second line after every start
averages two iterations."""

import os
import sys


def main() -> None:
    """Run pretrain_moh.main() with every micro-batch's loss printed."""
    import pretrain_moh
    from megatron_moh import train
    from tests.integration.checkpoint_runner import record_losses

    rank = os.environ["RANK"]

    def say(pair: tuple[int, float]) -> None:  # one write: the ranks share the pipe, print writes twice
        sys.stdout.write(f"exact loss: rank {rank} iteration {pair[0] + 1} {pair[1]!r}\n")
        sys.stdout.flush()

    record_losses(train, say)
    pretrain_moh.main()


if __name__ == "__main__":
    main()

"""Command-line programs: each module has build_parser() and main(argv), used by tools/ and the
console scripts."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (``PROG: error: ...``), like every other
    refusal of these tools."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")

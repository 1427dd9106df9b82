"""Command-line programs: each module has build_parser() and main(argv), used by tools/ and the
console scripts."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator

from megatron_moh.outputs import FULL, describe_os_error


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (``PROG: error: ...``), like every other
    refusal of these tools."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


@contextlib.contextmanager
def one_line_errors(prog: str, output: str | None = None) -> Iterator[None]:
    """Bad input (ValueError) and unusable paths (OSError) end the program with one line on stderr
    and exit code 2; a full disk met while writing an open file is named by ``output``."""
    try:
        yield
    except (OSError, ValueError) as err:
        if isinstance(err, OSError) and err.errno in FULL and not err.filename and output:
            err = OSError(err.errno, err.strerror, output)  # a write to an open file names nothing
        message = describe_os_error(err) if isinstance(err, OSError) else str(err)
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None

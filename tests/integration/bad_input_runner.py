"""Runs bad-input cases of pretrain_moh.py and the tools in ONE fresh process (one import of torch
and megatron), the way a user's shell would see them: exit code, stdout, stderr, whether a
process group was started, and which files under the case root changed.

    python tests/integration/bad_input_runner.py CASES.json RESULTS.json
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import traceback
import warnings
from pathlib import Path


class ReachedTraining(Exception):
    """A case got past every check: it would have started training."""


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    root = Path(cases["root"])
    warnings.simplefilter("ignore")  # library notes at import time are not the programs' messages

    import torch

    import megatron.training
    from megatron.training import global_vars

    import pretrain_moh
    from megatron_moh.commands import convert_checkpoint, preprocess_data, train_tokenizer

    def reached_training(*args, **kwargs):
        raise ReachedTraining

    global_vars.set_global_variables = reached_training  # a case that passes every check stops here
    megatron.training.pretrain = reached_training
    programs = {"pretrain_moh.py": pretrain_moh.main, "convert_checkpoint.py": convert_checkpoint.main,
                "preprocess_data.py": preprocess_data.main, "train_tokenizer.py": train_tokenizer.main}
    environment = dict(os.environ)
    results = {}
    for case in cases["cases"]:
        before = _snapshot(root)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                returned = programs[case["prog"]](case["argv"])
                code = returned if isinstance(returned, int) else 0
            except SystemExit as exit_:
                if isinstance(exit_.code, str):
                    print(exit_.code, file=sys.stderr)  # what the interpreter prints for SystemExit("...")
                    code = 1
                else:
                    code = exit_.code or 0
            except ReachedTraining:
                code = "reached training"
            except BaseException:  # noqa: BLE001 - a traceback is what the test looks for
                traceback.print_exc()
                code = "traceback"
        os.environ.clear()
        os.environ.update(environment)
        after = _snapshot(root)
        changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
        results[case["id"]] = dict(code=code, stdout=out.getvalue(), stderr=err.getvalue(), changed=changed,
                                   process_group=torch.distributed.is_initialized())
    Path(sys.argv[2]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

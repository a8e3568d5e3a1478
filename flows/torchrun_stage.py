"""What each torchrun process runs for a stage under `compute.nproc` > 1 (flows/stages.py).

`python -m ms2rgb.flows.torchrun_stage NAME ROOT [PARENT_RUN_ID]`: the stage runner starts it
through torchrun while it holds the project lock, so this entry takes no lock of its own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ms2rgb.flows.stages import run_stage
from ms2rgb.tasks.errors import Ms2rgbError
from ms2rgb.tasks.training import distributed
from ms2rgb.tasks.training.malloc import steady_malloc


def main(argv: list[str]) -> int:
    name, root, parent_run_id = argv[0], Path(argv[1]), (argv[2] if len(argv) > 2 and argv[2] else None)
    steady_malloc()
    if not distributed.is_writer():  # one progress log: process 0's (errors still reach stderr)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of this process
    try:
        run_stage(name, root, parent_run_id)
    except Ms2rgbError as exc:
        print(f"ms2rgb: error (process {distributed.rank()}): {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Run by accelerate's launcher in each process of a multi-process test (conftest's `train_each`): train each recipe
named on the command line in turn, in these same processes, as `peftkit train RECIPE` does in each of its processes.
One launch pays the processes' start (imports, ~6 s of a 2-process run of the tiny model's ~9 s) and the process
group once for several runs. `--resume`: each run resumes. An argument KEY=VALUE sets that environment variable for
the runs after it, KEY= unsets it (a run as verify re-runs one, PEFTKIT_TRIMMED_SLICES=0; a test's own log file). A
failed run stops them all."""

import os
import re
import sys

from peftkit.distributed import close
from peftkit.recipe import load_recipe
from peftkit.train import train

resume = "--resume" in sys.argv
for arg in (arg for arg in sys.argv[1:] if arg != "--resume"):
    if setting := re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", arg):
        key, value = setting.groups()
        if value:
            os.environ[key] = value
        else:
            os.environ.pop(key, None)
        continue
    try:
        train(load_recipe(arg), resume=resume)
    except BaseException:
        close(finished=False)
        print(f"train_each: the run of {arg} failed", file=sys.stderr)
        raise
close()

"""Run by accelerate's launcher in each process of a multi-process test (conftest's `train_each`): train each recipe
named on the command line in turn, in these same processes, as `peftkit train RECIPE` does in each of its processes.
One launch pays the processes' start (imports, ~6 s of a 2-process run of the tiny model's ~9 s) and the process
group once for several runs. `--resume`: each run resumes. A failed run stops them all."""

import sys

from peftkit.distributed import close
from peftkit.recipe import load_recipe
from peftkit.train import train

resume = "--resume" in sys.argv
for recipe in (arg for arg in sys.argv[1:] if arg != "--resume"):
    try:
        train(load_recipe(recipe), resume=resume)
    except BaseException:
        close(finished=False)
        print(f"train_each: the run of {recipe} failed", file=sys.stderr)
        raise
close()

"""The `peftkit` command: thin Typer wrappers around plain functions that tests call directly.

`app` (application.py) holds the commands, registered by recipe_commands.py and model_commands.py; `main` (run.py)
runs one as the `peftkit` process does."""

# Importing them registers the commands on `app`, in this order in `peftkit --help`: a recipe's and a run's
# commands, then those on models and adapters.
from peftkit.cli import recipe_commands  # noqa: F401
from peftkit.cli import model_commands  # noqa: F401
from peftkit.cli.application import app
from peftkit.cli.run import main

__all__ = ["app", "main"]

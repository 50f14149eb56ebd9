"""Recipes: the YAML file that describes a run, validated by pydantic.

    schema.py  the models: every setting and its default; `Recipe` there, each section in its own file
               (model_section.py, data_section.py, training_section.py, export_section.py, eval_section.py)
    reader.py  YAML with line numbers, duplicate keys, size/depth/alias limits
    loader.py  `load_recipe`: --set overrides, validation, errors in our words, path resolution; its parts:
               overrides.py (--set), keys.py (a key path's section, suggestions for a wrong key), messages.py
               (pydantic's errors at file:line), resolution.py (paths, adapter.init_from, after validation)

These models are the single source of truth for every setting and its default; the rest of peftkit
reads typed fields, never `dict.get(key, default)`. `peftkit validate RECIPE` prints the fully resolved
recipe, defaults included.

Paths. A relative path in a recipe (`model.name_or_path`, `data.train`, `data.eval`,
`export.output_dir`) is resolved against the directory of the recipe file, not the current directory,
so a recipe runs the same from anywhere. A model or dataset value that is not an existing path, does not
start with `/`, `./`, `../` or `~`, and (for data) has no file extension is taken as a Hugging Face hub id; a model's
or adapter's that can only be a path (`peftkit.local_or_hub.meant_locally`: `runs/merged` where runs/ is beside the
recipe) is a path.
"""

from peftkit.recipe.loader import format_validation_error, load_recipe
from peftkit.recipe.reader import MAX_DEPTH, MAX_MESSAGES, MAX_RECIPE_BYTES, MAX_VALUES
from peftkit.recipe.resolution import fetch_recorded, recorded
from peftkit.recipe.schema import (
    DATA_EXTENSIONS,
    AdapterConfig,
    DataConfig,
    DataSource,
    DType,
    EvalConfig,
    ExportConfig,
    ModelConfig,
    QuantizationConfig,
    Recipe,
    RopeScalingConfig,
    Section,
    TargetRegex,
    TrainingConfig,
    is_hub_dataset,
    is_local_dataset,
    is_saved_dataset,
)

__all__ = [
    "DATA_EXTENSIONS", "MAX_DEPTH", "MAX_MESSAGES", "MAX_RECIPE_BYTES", "MAX_VALUES", "AdapterConfig", "DataConfig", "DataSource",
    "DType", "EvalConfig", "ExportConfig", "ModelConfig", "QuantizationConfig", "Recipe", "RopeScalingConfig",
    "Section", "TargetRegex",
    "TrainingConfig", "fetch_recorded", "format_validation_error", "is_hub_dataset", "load_recipe", "is_local_dataset", "is_saved_dataset", "recorded",
]

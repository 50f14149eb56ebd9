"""Build the quickstart's tiny Llama-architecture model, character tokenizer and data, and the classification
recipe's tiny BERT encoder and sentiment data, multitask prompt tuning's source-task data, and the long-context
recipe's 64-position copy of the tiny Llama, a tiny Mixtral (recipes/methods/lora_moe.yaml), recipes/dpo.yaml's answer
pairs and recipes/kto.yaml's unpaired answers, offline.

    python scripts/make_tiny_assets.py [ROOT]     # default ROOT: artifacts/

Deterministic: the same files every time (the model's weights come from torch.manual_seed(0)).
"""

import sys
from pathlib import Path

from peftkit.tiny import (
    build_classification_assets,
    build_long_context_assets,
    build_moe_assets,
    build_multitask_assets,
    build_preference_assets,
    build_quickstart_assets,
)

if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "artifacts"
    for name, path in (build_quickstart_assets(root) | build_classification_assets(root) | build_multitask_assets(root)
                       | build_long_context_assets(root) | build_moe_assets(root) | build_preference_assets(root)).items():
        print(f"{name}: {path}")

"""A tokenizer peftkit loads saves the same files whatever the environment: transformers 5 kept how its files were
fetched (`local_files_only`, true under HF_HUB_OFFLINE=1) and wrote it into tokenizer_config.json, so an export's
tokenizer (adapter/ with model.add_tokens, merged/) and the tokenized-data cache's key differed between a run made
online and one made offline, and `peftkit verify` offline of a run made online reported its tokenizer files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
from peftkit.data.cache import tokenizer_digest
from peftkit.modeling import load_tokenizer
from peftkit.recipe import ModelConfig
tok = load_tokenizer(ModelConfig(name_or_path=sys.argv[1], add_tokens=["<|im_start|>", "<|im_end|>"]))
tok.save_pretrained(sys.argv[2])
print(tokenizer_digest(tok))
"""


def _saved(model: Path, out: Path, offline: str) -> tuple[str, bytes]:
    """(the cache's tokenizer digest, tokenizer_config.json) of the tokenizer loaded in a process with HF_HUB_OFFLINE
    `offline` (read once, when huggingface_hub is imported)."""
    env = os.environ | {"HF_HUB_OFFLINE": offline}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(model), str(out)], capture_output=True, text=True,
                          timeout=300, check=False, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()[-1], (out / "tokenizer_config.json").read_bytes()


def test_online_and_offline_save_the_same_tokenizer(tiny_llama, tmp_path):
    online, offline = _saved(tiny_llama, tmp_path / "on", "0"), _saved(tiny_llama, tmp_path / "off", "1")
    assert json.loads(online[1]).get("local_files_only") is False  # (transformers' default, as saved online before)
    assert offline == online

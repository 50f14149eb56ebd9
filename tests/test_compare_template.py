"""`peftkit eval --model BASE --adapter NAME=DIR ...` on conversations, without a recipe: the base row's chat template
where the base's tokenizer has none."""

from __future__ import annotations

import pytest

from peftkit.methods.lora import LoraConfig
from peftkit.tiny import write_jsonl
from tests.conftest import make_recipe, save_random_adapter
from tests.test_new_tokens_compare import _eval_json, bases  # noqa: F401 (the fixture)


def test_a_base_model_s_comparison_takes_the_template_its_adapters_carry(bases, tmp_path, monkeypatch):
    """`peftkit eval --model BASE --format chat --adapter a=DIR --adapter b=DIR` without a recipe, on a base without a
    chat template, of two adapters that carry the same one (a run's adapter/chat_template.jinja): the base row was
    refused for the template it lacked; it is the base under their template, as a recipe with that template gives it,
    and each adapter's row its evaluation alone."""
    from peftkit.data.chat_templates import ADAPTER_TEMPLATE, CHATML

    rows = [[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]] * 4
    write_jsonl(tmp_path / "d.jsonl", [{"messages": r} for r in rows])
    adapters = []
    for seed in (1, 2):
        out = save_random_adapter(bases["llama"], LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
                                  tmp_path / f"a{seed}", seed=seed)
        (out / ADAPTER_TEMPLATE).write_text(CHATML)
        adapters.append(out)
    data = ["--data", str(tmp_path / "d.jsonl"), "--format", "chat"]
    named = ["--adapter", f"a={adapters[0]}", "--adapter", f"b={adapters[1]}"]
    rows = _eval_json(monkeypatch, tmp_path / "rows.json", "--model", str(bases["llama"]), *data, *named)
    recipe = make_recipe(tmp_path / "r", bases["llama"], {"train": tmp_path / "d.jsonl", "eval": tmp_path / "d.jsonl"},
                         data={"format": "chat", "chat_template": "chatml", "max_length": 512})
    with_recipe = _eval_json(monkeypatch, tmp_path / "recipe.json", str(recipe), *named)
    assert rows["base"]["loss"] == pytest.approx(with_recipe["base"]["loss"], abs=1e-6)
    assert rows["base"]["num_tokens"] == with_recipe["base"]["num_tokens"] == 4 * 11  # "4<|im_end|>" in characters
    for name, adapter in zip("ab", adapters):
        alone = _eval_json(monkeypatch, tmp_path / f"{name}.json", "--model", str(bases["llama"]), *data,
                           "--adapter", str(adapter))
        assert rows[name]["loss"] == pytest.approx(alone["loss"], abs=1e-6)

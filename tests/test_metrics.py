"""Task metrics in `peftkit eval --metrics`: the scores against hand-computed values, the predictions file
holding exactly what generation produced, the same answers from an adapter applied live, merged, or loaded by
peft, and clear errors for bad flags."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM

from peftkit.data.prompts import load_prompts
from peftkit.decoding import Sampling, generate_texts
from peftkit.eval_job import eval_job
from peftkit.evaluate import evaluate
from peftkit.metrics import exact_match, normalize, score, token_f1
from peftkit.recipe import DataConfig, load_recipe
from peftkit.tiny import write_jsonl
from tests.conftest import cli_user_error, make_recipe


def test_scores_against_hand_computed_values():
    assert normalize("  The  Answer, is: 42! ") == "answer is 42"
    assert exact_match("The answer.", "answer") == 1.0 and exact_match("The answer.", "answer", "strip") == 0.0
    assert exact_match(" answer\n", "answer", "strip") == 1.0 and exact_match(" answer", "answer", "none") == 0.0
    # prediction "x b b c" vs reference "b c d": shared b, c -> P 2/4, R 2/3, F1 = 2 * (1/2 * 2/3) / (1/2 + 2/3)
    assert token_f1("x b b c", "b c d") == pytest.approx(4 / 7)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    # ROUGE-L: the longest common subsequence of "the cat sat on the mat" and "the cat sat" is 3 words:
    # P 3/6, R 3/3, F = 2/3; "mat the" vs "the mat": LCS 1 word, F = 1/2. Normalised, both of the second pair
    # are "mat" (articles dropped): one exact match in two.
    got = score(["the cat sat on the mat", "mat the"], ["the cat sat", "the mat"], ["rouge_l", "exact_match"])
    assert got == {"rouge_l": pytest.approx((2 / 3 + 1 / 2) / 2), "exact_match": 0.5}


def test_rouge_l_counts_words_of_every_script():
    """rouge-score's tokens are [a-z0-9] runs only: an exact answer in Russian or Chinese had none and scored 0 (and
    "café" was "caf"). Its ASCII tokens are kept (its own tokenizer is the reference on random printable text); other
    scripts' letters make words, and a Chinese character is a word of its own."""
    import random
    import string

    from rouge_score import tokenize

    from peftkit.metrics import rouge_tokens

    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice(string.printable) for _ in range(80))
        assert rouge_tokens(text) == tokenize.tokenize(text, None), text
    assert rouge_tokens("Привет, МИР! café_au-lait नमस्ते 你好") == ["привет", "мир", "café", "au", "lait", "नमस्ते",
                                                                   "你", "好"]
    assert score(["Привет мир", "你好世界"], ["привет, мир", "你好世界"], ["rouge_l"]) == {"rouge_l": 1.0}
    # "你好" against "你好世界": LCS 2 characters, P 2/2, R 2/4, F = 2/3
    assert score(["你好"], ["你好世界"], ["rouge_l"])["rouge_l"] == pytest.approx(2 / 3)


def test_unicode_equivalents_match_as_normalize_says():
    """"café" written with a combining accent (e + U+0301) and with the precomposed é (U+00E9) look the same and
    tokenizers produce either, but no metric matched them: exact_match 0 under every --normalize, rouge_l 0. `squad`
    now folds NFKC (compatibility forms too: full-width digits, ligatures), `strip` NFC (canonical equivalents
    only), `none` compares code points; ROUGE-L always takes the NFKC form."""
    decomposed, precomposed = "cafe\u0301", "caf\u00e9"
    for how in ("squad", "strip"):
        assert exact_match(f" {decomposed} ", precomposed, how) == 1.0, how
        assert token_f1(f"{decomposed} noir", f"{precomposed} noir", how) == 1.0, how
    assert exact_match(decomposed, precomposed, "none") == 0.0
    full_width, ligature = "\uff11\uff12", "\ufb01ne"  # "１２", "ﬁne"
    assert exact_match(full_width, "12") == 1.0 and exact_match(ligature, "Fine.") == 1.0
    assert exact_match(full_width, "12", "strip") == 0.0 and exact_match(ligature, "fine", "strip") == 0.0
    got = score([decomposed, f"{full_width} {ligature}"], [precomposed, "12 fine"], ["rouge_l"], "none")
    assert got == {"rouge_l": 1.0}


def _rows(n: int) -> list[dict]:
    return [{"instruction": f"add {i} and {i + 1}", "output": str(2 * i + 1)} for i in range(n)]


def test_eval_metrics_and_predictions_file(tiny_llama, tmp_path):
    """Half the references are set to what the model really answers: exact_match is exactly 0.5, and the
    predictions file holds the model's answers, the prompts training used and the references."""
    from transformers import AutoTokenizer

    data = tmp_path / "rows.jsonl"
    write_jsonl(data, _rows(4))
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    cfg = DataConfig(train=str(data))
    prompts = load_prompts(tok, str(data), "train", cfg)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    answers = generate_texts(model, tok, prompts, Sampling(max_new_tokens=6))
    rows = _rows(4)
    for row, answer in zip(rows[:2], answers[:2]):
        row["output"] = answer
    rows[2]["output"] = "a\u2028b\u2029c\x85d"  # separators JSON keeps raw: str.splitlines() would split the row
    write_jsonl(data, rows)

    out = tmp_path / "preds.jsonl"
    job = eval_job(None, [], str(tiny_llama), str(data), None, None, None, 4, None,
                   metrics="exact_match,token_f1,loss", max_new_tokens=6, predictions=out)
    result = evaluate(job)
    assert result["exact_match"] == 0.5 and result["num_rows"] == 4 and "loss" in result and "rouge_l" not in result
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [line["prediction"] for line in lines] == answers
    assert [line["reference"] for line in lines] == [r["output"] for r in rows]
    assert [line["prompt"] for line in lines] == [p.text for p in prompts]
    assert result["token_f1"] == pytest.approx(sum(token_f1(a, r["output"]) for a, r in zip(answers, rows)) / 4)


def test_same_answers_live_merged_and_in_peft(tiny_llama, number_data, tmp_path):
    from peft import PeftModel

    from peftkit.train import train

    recipe = make_recipe(tmp_path, tiny_llama, number_data, training={"max_steps": 2, "lr": 1e-2},
                         export={"merged": True})
    train(load_recipe(recipe), console=Console(quiet=True))
    run, data = tmp_path / "run", str(number_data["eval"])
    common = dict(metrics="exact_match,rouge_l", max_new_tokens=8)
    live = eval_job(run, [], None, None, None, None, None, None, None, **common, predictions=tmp_path / "live.jsonl")
    merged = eval_job(None, [], str(run / "merged"), data, None, None, None, None, None, **common,
                      predictions=tmp_path / "merged.jsonl")
    assert evaluate(live) == evaluate(merged)
    live_answers = [json.loads(x)["prediction"] for x in (tmp_path / "live.jsonl").read_text().splitlines()]
    assert live_answers == [json.loads(x)["prediction"] for x in (tmp_path / "merged.jsonl").read_text().splitlines()]

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), run / "adapter").eval()
    theirs = []
    for prompt in load_prompts(tok, data, "train", DataConfig(train=data)):
        with torch.no_grad():
            out = reference.generate(input_ids=torch.tensor([prompt.ids]), max_new_tokens=8, do_sample=False,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        theirs.append(tok.decode(out[0, len(prompt.ids):], skip_special_tokens=True))
    assert live_answers == theirs
    assert len(set(theirs)) > 1
    base = eval_job(None, [], str(tiny_llama), data, None, None, None, None, None, **common,
                    predictions=tmp_path / "base.jsonl")
    evaluate(base)
    base_answers = [json.loads(x)["prediction"] for x in (tmp_path / "base.jsonl").read_text().splitlines()]
    assert live_answers != base_answers  # the adapter changes answers: all three ignoring it would agree too


def test_bad_flags_are_clear_errors(tiny_llama, number_data, monkeypatch, capsys):
    base = ["eval", "--model", str(tiny_llama), "--data", str(number_data["eval"])]
    assert "bleu is not a metric peftkit computes; choose from exact_match, token_f1, rouge_l, loss, perplexity" in \
        cli_user_error(monkeypatch, capsys, *base, "--metrics", "exact_match,bleu")
    assert "--predictions: nothing is generated without a generation metric" in \
        cli_user_error(monkeypatch, capsys, *base, "--predictions", "p.jsonl")
    assert "--normalize 'lower': use one of squad, strip, none" in \
        cli_user_error(monkeypatch, capsys, *base, "--metrics", "exact_match", "--normalize", "lower")
    assert "--format 'text' has no prompt to generate from" in \
        cli_user_error(monkeypatch, capsys, *base, "--metrics", "rouge_l", "--format", "text")


def test_rouge_l_leaves_out_the_punctuation_of_scripts_written_without_spaces():
    """Each character of Japanese, Thai, Myanmar or Khmer text is a word, but their punctuation, as everywhere else, is
    a separator: the katakana middle dot of a name, Myanmar's and Khmer's full stops, Thai's angkhankhu counted as
    words, so an answer without them (or with a space) was not an exact match."""
    from peftkit.metrics import rouge_tokens

    assert rouge_tokens("ジョン・スミス") == ["ジ", "ョ", "ン", "ス", "ミ", "ス"] == rouge_tokens("ジョン スミス")
    assert rouge_tokens("ကို။") == ["က", "ိ", "ု"] and rouge_tokens("ក។") == ["ក"] and rouge_tokens("ก๚") == ["ก"]
    assert score(["ジョン・スミス", "ကို"], ["ジョン スミス", "ကို။"], ["rouge_l"]) == {"rouge_l": 1.0}


def test_json_and_predictions_on_one_file_is_refused(tiny_llama, number_data, tmp_path, monkeypatch, capsys):
    """`--json out.json --predictions out.json`: the metrics, written last, replaced the predictions without a word."""
    out = tmp_path / "out.json"
    err = " ".join(cli_user_error(monkeypatch, capsys, "eval", "--model", str(tiny_llama), "--data",
                                  str(number_data["eval"]), "--metrics", "exact_match", "--predictions", str(out),
                                  "--json", str(tmp_path / "." / "out.json")).split())
    assert f"--json {tmp_path / '.' / 'out.json'} is the --predictions file too: the metrics would replace the " \
           "predictions. Give --json another path." in err
    assert not out.exists()


def test_json_and_predictions_on_one_name_of_several_eval_sets_writes_both(tiny_llama, number_data, tmp_path,
                                                                           monkeypatch, capsys):
    """Of a data.eval of several sets, `--json p.jsonl --predictions p.jsonl` was refused as one file, though the
    answers go to p.SET.jsonl each and p.jsonl holds the metrics alone: now p.jsonl holds each set's figures and
    p.SET.jsonl its answers, both what `--data FILE` of that set's file alone writes. --json naming a set's
    predictions file (p.numbers.jsonl) is still refused, before anything is written."""
    from peftkit.cli import main

    other = tmp_path / "other.jsonl"
    write_jsonl(other, [{"instruction": f"Add one to {k}.", "output": str(k + 1)} for k in range(3)])
    files = {"numbers": number_data["eval"], "other": other}
    recipe = make_recipe(tmp_path / "r", tiny_llama, number_data, data={"eval": {k: str(v) for k, v in files.items()}},
                         eval={"max_new_tokens": 3})

    def written(*args: str) -> None:
        monkeypatch.setattr("sys.argv", ["peftkit", "eval", str(recipe), "--metrics", "exact_match", *args])
        main()

    p = tmp_path / "p.jsonl"
    written("--json", str(p), "--predictions", str(p))
    figures = json.loads(p.read_text())
    assert sorted(figures) == ["numbers", "other"]
    for name, path in files.items():
        alone = tmp_path / f"alone-{name}"
        written("--data", str(path), "--json", f"{alone}.json", "--predictions", f"{alone}.jsonl")
        assert figures[name] == json.loads((tmp_path / f"alone-{name}.json").read_text())
        assert (tmp_path / f"p.{name}.jsonl").read_bytes() == (tmp_path / f"alone-{name}.jsonl").read_bytes()
        assert len((tmp_path / f"p.{name}.jsonl").read_text().splitlines()) == len(path.read_text().splitlines())
    clash = tmp_path / "q.numbers.jsonl"
    err = " ".join(cli_user_error(monkeypatch, capsys, "eval", str(recipe), "--metrics", "exact_match", "--json",
                                  str(clash), "--predictions", str(tmp_path / "q.jsonl")).split())
    assert (f"--json {clash} is the --predictions file of numbers, {clash}, too: the metrics would replace the "
            "predictions. Give --json another path.") in err, err
    assert not list(tmp_path.glob("q*"))


def test_an_answer_that_is_its_reference_with_model_add_tokens_markers_scores_1(tiny_llama):
    """A reference that writes a new special token (`model.add_tokens`' `<calc>`) is matched by an answer of the same
    tokens: the answer was decoded without its special tokens ('\\r' against '<calc><calc>...\\r'), so exact match,
    token F1 and ROUGE-L scored 0 for the model writing its reference token for token. The tokenizer's own tokens
    (EOS, padding) stay out of the text."""
    from transformers import AutoTokenizer

    from peftkit.data.prompts import Prompt
    from peftkit.decoding import stop_token_ids
    from peftkit.evaluate import generation_scores
    from tests.test_generate import greedy_no_cache

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.add_special_tokens({"additional_special_tokens": ["<calc>"]})
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    torch.manual_seed(0)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    marker, prompt = tok.convert_tokens_to_ids("<calc>"), tok("count: 1 2 3")["input_ids"]
    first = greedy_no_cache(model, prompt, stop_token_ids(model, tok), 1)[0]
    with torch.no_grad():  # the marker is written where `first` was: part of the answer, not all of it
        model.lm_head.weight[marker] = 1.001 * model.lm_head.weight[first]
    answer = greedy_no_cache(model, prompt, stop_token_ids(model, tok), 8)
    reference = tok.decode(answer)  # the answer as a data row writes it
    assert marker in answer and len(set(answer)) > 1 and "<calc>" in reference
    scores, texts = generation_scores(model, tok, [Prompt(prompt, "count: 1 2 3", reference)],
                                      ["exact_match", "token_f1", "rouge_l"], Sampling(max_new_tokens=8), 1, "squad")
    assert texts == [reference] and scores == {"exact_match": 1.0, "token_f1": 1.0, "rouge_l": 1.0}

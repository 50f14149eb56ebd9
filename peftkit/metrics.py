"""Task metrics of generated answers against the data's reference answers, each a mean over rows in [0, 1], and of a
classifier's predicted labels (`accuracy`, `macro_f1`).

- `exact_match`: the normalised prediction equals the normalised reference.
- `token_f1`: F1 of the normalised whitespace tokens shared by prediction and reference (SQuAD's, counting
  repeats; 1 when both are empty).
- `rouge_l`: ROUGE-L F-measure (longest common subsequence) from Google's `rouge-score` package, without stemming,
  on its tokenisation (lowercased, words of letters and digits) extended past ASCII (`rouge_tokens`): its own keeps
  only a-z and 0-9, so an exact answer in Russian or Chinese had no tokens and scored 0. `--normalize` does not
  apply: the text is always NFKC-normalised first (as under `squad`, below; ROUGE is as blind to case and
  punctuation as `squad`), so a word written with a combining accent, in full-width letters or with a ligature is
  the same word as its precomposed, ASCII or unligated form (rouge-score's own tokens differ: "cafe" and "caf").

Normalisation before `exact_match` and `token_f1` (`--normalize`):
- `squad` (default): Unicode NFKC (canonical and compatibility equivalents: "e" + combining acute is "é", full-width
  "１２" is "12", the ligature "ﬁ" is "fi"), then lowercase, punctuation removed, the articles a / an / the
  removed, whitespace collapsed — the SQuAD evaluation script's, so `"The answer."` matches `answer`;
- `strip`: Unicode NFC (canonical equivalents only: the two spellings of "é" match, "１２" and "12" do not), then
  surrounding whitespace removed, nothing else (case and punctuation count);
- `none`: the texts as they are, code point for code point.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter

from peftkit.errors import PeftkitError

GENERATION_METRICS = ("exact_match", "token_f1", "rouge_l")
LOSS_METRICS = ("loss", "perplexity")
CLASSIFICATION_METRICS = ("accuracy", "macro_f1")
PREFERENCE_METRICS = ("reward_accuracy", "reward_margin")
"""What a DPO run's evaluations report beside the loss (`peftkit.preference.PreferenceEval`): higher is better."""
REWARDS = ("chosen_reward", "rejected_reward")
"""A DPO evaluation's mean rewards of the chosen and of the rejected answers, reported too."""
KTO_METRICS = ("reward_margin", "kl")
"""What a KTO run's evaluations report beside the loss and REWARDS (`peftkit.kto`): the desirable answers' mean reward
less the undesirable ones', and the KL estimate."""
LOWER_IS_BETTER = (*LOSS_METRICS, "rejected_reward", "kl")
"""The figures early stopping and export.best minimize under `mode: auto` (the rest they maximize): the losses, the
rejected (undesirable) answers' mean reward, and KTO's KL estimate, the policy's drift from the reference."""
METRICS = GENERATION_METRICS + LOSS_METRICS + CLASSIFICATION_METRICS
NORMALIZATIONS = ("squad", "strip", "none")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str, how: str = "squad") -> str:
    """`text` as `exact_match` and `token_f1` compare it under `how` (the module docstring says what each does)."""
    if how == "none":
        return text
    if how == "strip":  # canonical equivalence: "café" with a combining accent (e + U+0301) is "café" (U+00E9)
        return unicodedata.normalize("NFC", text).strip()
    text = unicodedata.normalize("NFKC", text)  # also compatibility forms: "１２" is "12", "ﬁ" is "fi"
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(prediction: str, reference: str, how: str = "squad") -> float:
    return float(normalize(prediction, how) == normalize(reference, how))


def token_f1(prediction: str, reference: str, how: str = "squad") -> float:
    predicted, expected = normalize(prediction, how).split(), normalize(reference, how).split()
    if not predicted or not expected:
        return float(predicted == expected)
    shared = sum((Counter(predicted) & Counter(expected)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(expected)
    return 2 * precision * recall / (precision + recall)


def accuracy(predictions: list[int], references: list[int]) -> float:
    """Share of rows whose predicted label id is the reference's (0 for no rows)."""
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / max(len(references), 1)


def macro_f1(predictions: list[int], references: list[int]) -> float:
    """The unweighted mean over classes of each class's F1 (2 TP / (2 TP + FP + FN)), over the classes that occur
    in the references or the predictions: scikit-learn's `f1_score(average="macro")` with its default labels (a
    class never predicted but present scores 0 and counts)."""
    classes = sorted(set(references) | set(predictions))
    scores = []
    for c in classes:
        tp = sum(p == c and r == c for p, r in zip(predictions, references, strict=True))
        wrong = sum((p == c) != (r == c) for p, r in zip(predictions, references, strict=True))  # FP + FN
        scores.append(2 * tp / (2 * tp + wrong))
    return sum(scores) / max(len(scores), 1)


def parse_metrics(spec: str | list[str]) -> list[str]:
    """`exact_match,rouge_l` (or a list) as a checked list, in the order given, without repeats."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise PeftkitError(f"--metrics {','.join(names) or spec!r}: {', '.join(unknown) or 'nothing'} is not a metric "
                           f"peftkit computes; choose from {', '.join(METRICS)}.")
    return list(dict.fromkeys(names))


def rouge_tokens(text: str) -> list[str]:
    """ROUGE's words in any script: rouge-score's tokenisation (lowercase; runs of letters and digits, everything else
    a separator) with the letters, combining marks and digits of every script, and each of those of a script
    written without spaces between words (Chinese, Japanese kana, Thai, Lao, Khmer, Myanmar) a word of its own; their
    punctuation (the katakana middle dot, Myanmar's and Khmer's full stops) separates, as elsewhere. Taken of the
    text's NFKC form, so "e" + a combining acute and "é", or full-width "ＡＢ" and "ab", make the same word. ASCII text
    gives rouge-score's own tokens (tested)."""
    words, word = [], []
    for ch in unicodedata.normalize("NFKC", text).lower():
        letter = unicodedata.category(ch)[0] in "LMN"
        if letter and not _UNSPACED.match(ch):
            word.append(ch)
            continue
        if word:
            words.append("".join(word))
            word = []
        if letter:  # a letter of a script without spaces: a word alone
            words.append(ch)
    return words + (["".join(word)] if word else [])


# Scripts written without spaces between words: CJK ideographs (and their extensions and compatibility forms),
# hiragana and katakana, Thai, Lao, Myanmar, Khmer.
_UNSPACED = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
                       "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff]")


class _RougeTokens:
    """`rouge_tokens` as rouge-score's scorer takes a tokenizer."""

    def tokenize(self, text: str) -> list[str]:
        return rouge_tokens(text)


def score(predictions: list[str], references: list[str], metrics: list[str], how: str = "squad") -> dict[str, float]:
    """The mean of each generation metric of `metrics` over the rows."""
    if how not in NORMALIZATIONS:
        raise PeftkitError(f"--normalize {how!r}: use one of {', '.join(NORMALIZATIONS)}.")
    per_row = {"exact_match": lambda p, r: exact_match(p, r, how), "token_f1": lambda p, r: token_f1(p, r, how)}
    if "rouge_l" in metrics:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_RougeTokens())
        per_row["rouge_l"] = lambda p, r: scorer.score(r, p)["rougeL"].fmeasure  # score(target, prediction)
    n = max(len(predictions), 1)
    return {m: sum(per_row[m](p, r) for p, r in zip(predictions, references, strict=True)) / n
            for m in metrics if m in GENERATION_METRICS}

"""The real-model benchmark's downstream chat tasks: seeded, with disjoint held-out splits, scored by exact match.

* ``number-words`` needs what the pretrained model knows: it has read English number names, but must learn to
  answer ``Write 347 in words.`` with exactly ``three hundred forty-seven`` (lower case, hyphenated tens, no
  "and", nothing else). Zero-shot it answers in sentences, so exact match is near zero while the knowledge
  for a high ceiling is there.
* ``reverse-words`` is a skill it must learn: ``Reverse: lamp river cold bread`` -> ``bread cold river lamp``,
  four to five words drawn from a fixed list, a format and an operation it has no reason to produce unasked.

Each example is a ``{"messages": [...]}`` row (system, user, assistant) that ``emloc`` reads as chat data: only
the answer is a training target, and exact match is greedy decoding reproducing it token for token.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = "Answer with the result only."

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_WORDS = ("apple river stone cloud green lamp bread cold music window garden silver horse paper winter table "
          "forest candle yellow ocean bottle mountain pencil summer button rabbit orange castle mirror dragon "
          "butter violin planet basket copper tiger island jacket honey rocket pillow desert hammer lemon "
          "feather wagon tunnel marble spider cookie anchor helmet carpet ribbon").split()


def number_words(n: int) -> str:
    """American English name of ``0 <= n < 1000``: ``three hundred forty-seven``."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    hundreds, rest = divmod(n, 100)
    return f"{_ONES[hundreds]} hundred" + (f" {number_words(rest)}" if rest else "")


def _number_words_item(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(1, 999)
    return f"Write {n} in words.", number_words(n)


def _reverse_words_item(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, rng.randint(4, 5))
    return "Reverse: " + " ".join(words), " ".join(reversed(words))


TASKS = {"number-words": _number_words_item, "reverse-words": _reverse_words_item}


def chat(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt},
                         {"role": "assistant", "content": answer}]}


def make_splits(task: str, train_size: int, test_size: int, seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """Disjoint train and held-out splits of ``task`` (no prompt in both), the same for a seed everywhere."""
    rng, seen, rows = random.Random(f"{task}-{seed}"), set(), []
    while len(rows) < train_size + test_size:
        prompt, answer = TASKS[task](rng)
        if prompt not in seen:
            seen.add(prompt)
            rows.append(chat(prompt, answer))
    return rows[:train_size], rows[train_size:]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path

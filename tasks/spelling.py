"""Spelling tasks, generated from a word list with a seeded RNG (no download):
SimpleSpelling spells a word letter by letter ("apple" -> "a-p-p-l-e"), and SpellingBee
counts a letter in a word, spelling it out and then checking with the calculator tool
('strawberry'.count('r')). Tokens hide letters from the model; these teach it to reach them.

The default word list is tasks/data/words.txt (1,000 common English words, bundled);
--words-path takes another list, one word per line, plain or zipped (e.g.
../shared/data/words/words_alpha.zip). About a tenth of the words (by a hash of the word) are
held out: the test split asks only about them, the train split never does."""

import random
import re
import zipfile
import zlib
from pathlib import Path

from common import UserError
from tasks.common import Task, last_number

DEFAULT_WORDS = Path(__file__).resolve().parent / "data" / "words.txt"
WORD = re.compile(r"^[a-z]{2,20}$")
ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def load_words(path=None) -> list[str]:
    """Lowercase alphabetic words, sorted and unique, from a .txt (one per line) or a .zip of one."""
    path = Path(path).expanduser() if path else DEFAULT_WORDS
    text = ""
    if path.suffix == ".zip" and path.is_file():
        with zipfile.ZipFile(path) as z:
            text = "\n".join(z.read(n).decode("utf-8", errors="replace") for n in z.namelist() if n.endswith(".txt"))
    elif path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
    words = sorted({w for w in (line.strip().lower() for line in text.splitlines()) if WORD.match(w)})
    if len(words) < 2:  # the test split holds some out
        raise UserError(f"word list {path}: no such file, or fewer than 2 words (a .txt or .zip, one word per line)")
    return words


def is_test_word(word: str) -> bool:
    """About 1 word in 10 is held out for the test split, chosen by a stable hash of the word
    (not by position or a seed), so a word stays on its side whatever list it comes in."""
    return zlib.crc32(word.encode()) % 10 == 0


def split_words(words: list[str], split: str) -> list[str]:
    """The words of `split` ("train" or "test"): disjoint, and both non-empty for any list of
    two or more words (a tiny list may hash all to one side: then one word moves over)."""
    assert len(words) >= 2, words
    test = [w for w in words if is_test_word(w)]
    train = [w for w in words if not is_test_word(w)]
    if not test:
        test.append(train.pop(0))
    elif not train:
        train.append(test.pop(0))
    return test if split == "test" else train


class _GeneratedTask(Task):
    """Example i is drawn from its own RNG seeded by (seed, split, i): random access, the
    same on every run. Train and test draw from disjoint words (split_words), so a test
    prompt never appeared in training."""

    def __init__(self, size=1000, split="train", seed=42, words_path=None, **kwargs):
        super().__init__(**kwargs)
        assert split in ("train", "test"), split
        self.size, self.split, self.seed = size, split, seed
        self.words = split_words(load_words(words_path), split)

    def num_examples(self):
        return self.size

    def rng(self, index):
        return random.Random(f"{type(self).__name__}-{self.seed}-{self.split}-{index}")


SPELL_QUESTIONS = [
    "Spell the word {w}.",
    "How do you spell '{w}'?",
    "Spell {w} letter by letter.",
    "Can you spell \"{w}\" for me?",
    "spell {w}",
    "What are the letters in the word {w}?",
]


class SimpleSpelling(_GeneratedTask):
    """SimpleSpelling(size=1000, split="train", seed=42, words_path=None)."""

    eval_type = "generative"

    def get_example(self, index):
        rng = self.rng(index)
        word = rng.choice(self.words)
        question = rng.choice(SPELL_QUESTIONS).format(w=word)
        return {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": f"{word} is spelled {'-'.join(word)}."},
            ],
            "word": word,
        }

    def evaluate(self, conversation, completion: str) -> bool:
        spelled = re.findall(r"\b[a-zA-Z](?:-[a-zA-Z])+\b", completion)
        return bool(spelled) and spelled[-1].replace("-", "").lower() == conversation["word"]


COUNT_QUESTIONS = [
    "How many {l}s are in {w}?",
    "How many times does the letter '{l}' appear in '{w}'?",
    "Count the letter {l} in the word {w}.",
    "How many '{l}' are there in \"{w}\"?",
    "how many {l} in {w}",
    "In the word {w}, how many times does {l} occur?",
]


class SpellingBee(_GeneratedTask):
    """SpellingBee(size=1000, split="train", seed=42, words_path=None): count a letter in a word."""

    eval_type = "generative"

    def get_example(self, index):
        rng = self.rng(index)
        word = rng.choice(self.words)
        # mostly a letter of the word, sometimes one it lacks (answer 0)
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(ALPHABET)
        count = word.count(letter)
        question = rng.choice(COUNT_QUESTIONS).format(l=letter, w=word)
        times = "time" if count == 1 else "times"
        return {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": [
                    {"type": "text", "text": f"Spelled out, {word} is {'-'.join(word)}. Let me count the "
                                             f"'{letter}' with Python: "},
                    {"type": "python", "text": f"'{word}'.count('{letter}')"},
                    {"type": "python_output", "text": str(count)},
                    {"type": "text", "text": f"The letter '{letter}' appears {count} {times} in '{word}'."},
                ]},
            ],
            "answer": str(count),
        }

    def evaluate(self, conversation, completion: str) -> bool:
        # the answer is the last number the model states (tool output included, it is text too)
        return last_number(completion) == conversation["answer"]

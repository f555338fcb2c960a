"""ARC (AI2 Reasoning Challenge): grade-school science multiple choice, Easy and Challenge
sets (allenai/ai2_arc). Options are relabelled A, B, C, ... in their given order (a few
questions use 1-4 as labels, and some have 3 or 5 options)."""

from tasks.common import MultipleChoiceTask, load_rows, mc_conversation


def parse_row(row):
    """(question, choices, answer_index) from a Hub row (question: str, choices: {text, label})
    or an original ARC jsonl row (question: {stem, choices: [{text, label}]})."""
    if isinstance(row["question"], dict):
        question = row["question"]["stem"]
        texts = [c["text"] for c in row["question"]["choices"]]
        labels = [c["label"] for c in row["question"]["choices"]]
    else:
        question, texts, labels = row["question"], row["choices"]["text"], row["choices"]["label"]
    return question, texts, labels.index(row["answerKey"])


class ARC(MultipleChoiceTask):
    """ARC(subset="ARC-Easy"|"ARC-Challenge", split="train"|"validation"|"test", path=None).
    Offline: path is the Hub parquet, or the original ARC jsonl (e.g. ARC-Easy-Test.jsonl)."""

    path_flag = "--arc-path"

    def __init__(self, subset="ARC-Easy", split="test", path=None, **kwargs):
        super().__init__(**kwargs)
        assert subset in ("ARC-Easy", "ARC-Challenge") and split in ("train", "validation", "test"), (subset, split)
        self.subset = subset
        self.rows = load_rows("allenai/ai2_arc", subset, split, path, subset, self.path_flag,
                              "ARC jsonl (question.stem, question.choices, answerKey) or the Hub parquet")

    @property
    def name(self):
        return self.subset

    def get_example(self, index):
        question, choices, answer = parse_row(self.rows[index])
        return mc_conversation(question, choices, answer)

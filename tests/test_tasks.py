"""Tasks: real rows rendered through the tokenizer with their loss masks, the GSM8K tool
calls, answer extraction, mixtures, and the downloader against a local
127.0.0.1 server (including failing fast when offline)."""

import io
import json
import os
import re
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tasks.common
from common import UserError
from tasks.arc import ARC
from tasks.arithmetic import Arithmetic
from tasks.common import LETTERS, Task, TaskMixture, TaskSequence, last_number, normalize_number
from tasks.gsm8k import GSM8K, extract_answer, solution_parts
from tasks.humaneval import HumanEval, build_program, extract_code
from tasks.identity import Identity
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk, tidy
from tasks.spelling import SimpleSpelling, SpellingBee, load_words, split_words

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def need(*parts):
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (../shared/data beside the repo)")
    return path


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv("SPEEDCHAT_HF_URL", raising=False)
    monkeypatch.setattr(tasks.common, "RETRY_BACKOFF", 0.0)
    return tmp_path / "base"


# ---------------------------------------------------------------------------
# Rendering through the real tokenizer


@pytest.fixture(scope="module")
def tok():
    from tokenizer import Tokenizer

    texts = [json.dumps(c) for c in Identity()] + load_words()
    texts += ["The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) ' \" # $ , ."] * 20
    return Tokenizer.train_from_iterator(texts, vocab_size=512)


def expected_rendering(conversation):
    """(full text, supervised text) that render_conversation must produce, per INTERFACES.md."""
    messages = conversation["messages"]
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    messages = messages[1:] if system is not None else messages
    full, supervised = "<|bos|>", ""
    for i, m in enumerate(messages):
        if m["role"] == "user":
            content = m["content"] if i or system is None else system + "\n\n" + m["content"]
            full += f"<|user_start|>{content}<|user_end|>"
            continue
        parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
        full += "<|assistant_start|>"
        for p in parts:
            if p["type"] == "text":
                full += p["text"]
                supervised += p["text"]
            elif p["type"] == "python":
                s = f"<|python_start|>{p['text']}<|python_end|>"
                full, supervised = full + s, supervised + s
            else:
                full += f"<|output_start|>{p['text']}<|output_end|>"
        full += "<|assistant_end|>"
        supervised += "<|assistant_end|>"
    return full, supervised


def check_rendering(tok, conversation):
    ids, mask = tok.render_conversation(conversation, max_tokens=10**9)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    full, supervised = expected_rendering(conversation)
    assert tok.decode(ids) == full
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == supervised
    return ids, mask


def real_tasks():
    """One instance of every task, on real local rows where they are needed."""
    return {
        "GSM8K": lambda: GSM8K(path=need("gsm8k", "train.jsonl")),
        "MMLU": lambda: MMLU(split="validation", path=need("mmlu")),
        "HumanEval": lambda: HumanEval(path=need("humaneval", "HumanEval_first40.jsonl")),
        "SmolTalk": lambda: SmolTalk(path=need("chat", "dummy_conversation.json")),
        "SelfInstruct": lambda: SmolTalk(path=need("chat", "seed_tasks.jsonl")),
        "SimpleSpelling": lambda: SimpleSpelling(size=50),
        "SpellingBee": lambda: SpellingBee(size=50),
        "SpellingBeeWordsAlpha": lambda: SpellingBee(size=50, words_path=need("words", "words_alpha.zip")),
        "Arithmetic": lambda: Arithmetic(size=50),
        "Identity": lambda: Identity(),
    }


@pytest.mark.parametrize("name", list(real_tasks()))
def test_render_each_task(tok, name):
    task = real_tasks()[name]()
    assert len(task) > 0
    for i in range(0, len(task), max(1, len(task) // 7)):
        ids, mask = check_rendering(tok, task[i])
        assert 0 < sum(mask) < len(mask)


def test_render_gsm8k_masks_tool_output(tok):
    conversation = GSM8K(path=need("gsm8k", "train.jsonl"))[0]
    ids, mask = check_rendering(tok, conversation)
    out_start, out_end = tok.encode_special("<|output_start|>"), tok.encode_special("<|output_end|>")
    py_start = tok.encode_special("<|python_start|>")
    assert ids.count(out_start) == ids.count(py_start) == 2
    inside = False
    for token, m in zip(ids, mask):
        if token == out_start:
            inside = True
        if inside or token == py_start:
            assert m == (0 if inside else 1)
        if token == out_end:
            inside = False


def test_render_multiple_choice_answer_is_one_supervised_letter(tok):
    conversation = MMLU(split="dev", path=need("mmlu", "dev"))[0]
    ids, mask = check_rendering(tok, conversation)
    supervised = [i for i, m in zip(ids, mask) if m]
    assert len(supervised) == 2  # the letter, then <|assistant_end|>
    assert tok.decode(supervised[:1]) in conversation["letters"]
    # each option letter is tokenized in the prompt the way the answer is
    for letter in conversation["letters"]:
        assert tok.encode(letter)[0] in ids[:ids.index(tok.encode_special("<|assistant_start|>"))]


# ---------------------------------------------------------------------------
# Task base, mixtures, sequences


def test_slicing():
    full = Arithmetic(size=10)
    part = Arithmetic(size=10, start=2, stop=9, step=3)
    assert len(part) == 3
    assert [c["answer"] for c in part] == [full[i]["answer"] for i in (2, 5, 8)]
    assert part[-1] == full[8] and part[0:2] == [full[2], full[5]]
    with pytest.raises(IndexError):
        part[3]
    assert len(Arithmetic(size=10, start=8, stop=100)) == 2
    assert len(Arithmetic(size=10, start=12)) == 0


def test_mixture_is_deterministic_and_complete():
    a, b, c = Arithmetic(size=30), SpellingBee(size=20), Identity()
    mix = TaskMixture([a, b, c], seed=7)
    assert len(mix) == 30 + 20 + len(c)
    first = [m["messages"][0]["content"] for m in mix]
    assert first == [m["messages"][0]["content"] for m in TaskMixture([a, b, c], seed=7)]
    assert first != [m["messages"][0]["content"] for m in TaskMixture([a, b, c], seed=8)]
    everything = [x["messages"][0]["content"] for t in (a, b, c) for x in t]
    assert sorted(first) == sorted(everything)  # a permutation: every example exactly once
    assert first[:10] != everything[:10]  # and actually shuffled
    assert len(TaskMixture([a, a, b])) == 80  # listing a task twice oversamples it
    sliced = TaskMixture([a, b, c], seed=7, start=5, stop=15)
    assert [m["messages"][0]["content"] for m in sliced] == first[5:15]


def test_sequence_keeps_order():
    a, b = Arithmetic(size=3), Identity(stop=2)
    seq = TaskSequence([a, b])
    assert len(seq) == 5
    assert [x["messages"] for x in seq] == [x["messages"] for x in list(a) + list(b)]


def test_generated_tasks_are_deterministic_and_split():
    for cls in (Arithmetic, SpellingBee, SimpleSpelling):
        assert [x["messages"] for x in cls(size=20)] == [x["messages"] for x in cls(size=20)]
        assert [x["messages"] for x in cls(size=20)] != [x["messages"] for x in cls(size=20, split="test")]
        assert [x["messages"] for x in cls(size=20)] != [x["messages"] for x in cls(size=20, seed=1)]


def test_base_task_is_abstract():
    with pytest.raises(NotImplementedError):
        len(Task())
    with pytest.raises(NotImplementedError):
        Identity().evaluate(Identity()[0], "hi")


# ---------------------------------------------------------------------------
# GSM8K


@pytest.mark.parametrize("text,answer", [
    ("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
    ("so the total is\n#### 1,234", "1234"),
    ("#### $5", "5"),
    ("#### $1,000,000", "1000000"),
    ("#### -3", "-3"),
    ("#### 3.50", "3.5"),
    ("####10.", "10"),
    ("#### 12345678901234567890", "12345678901234567890"),
    ("The answer is 5.", None),
    ("", None),
    ("#### none", None),
    ("#### 7\nthen rambling #### 9", "7"),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_number_helpers():
    assert normalize_number("2.0") == "2" and normalize_number("$1,250.50") == "1250.5"
    assert last_number("3 apples and 4.0 pears") == "4" and last_number("none") is None


def test_gsm8k_tool_parts_for_a_known_row():
    task = GSM8K(path=need("gsm8k", "train.jsonl"))
    assert len(task) == 7473
    conversation = task[0]
    assert conversation["messages"][0] == {"role": "user", "content": (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?")}
    assert conversation["messages"][1] == {"role": "assistant", "content": [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
    ]}
    assert conversation["answer"] == "72"


def test_gsm8k_parts_rebuild_every_real_solution():
    rows = [json.loads(line) for line in need("gsm8k", "train.jsonl").read_text().splitlines()]
    for row in rows:
        parts = solution_parts(row["answer"])
        rebuilt, i = "", 0
        while i < len(parts):
            if parts[i]["type"] == "python":
                assert parts[i + 1]["type"] == "python_output"
                rebuilt += f"<<{parts[i]['text']}={parts[i + 1]['text']}>>"
                i += 2
            else:
                rebuilt += parts[i]["text"]
                i += 1
        assert rebuilt == row["answer"]
        assert parts[-1]["type"] == "text" and "####" in parts[-1]["text"]
        assert extract_answer(row["answer"]) == normalize_number(row["answer"].split("####")[-1])


def test_gsm8k_evaluate():
    task = GSM8K(path=need("gsm8k", "train.jsonl"))
    assert task.eval_type == "generative"
    conversation = task[0]
    assert task.evaluate(conversation, "She sold 72 in all.\n#### 72")
    assert task.evaluate(conversation, "#### 72.00")
    assert not task.evaluate(conversation, "#### 71")
    assert not task.evaluate(conversation, "72")  # no final answer line


# ---------------------------------------------------------------------------
# Multiple choice


def test_mmlu_real_rows():
    task = MMLU(split="validation", path=need("mmlu"))
    assert len(task) == 1531 and task.eval_type == "categorical"
    assert len(MMLU(split="dev", path=need("mmlu", "dev"))) == 285
    subjects = {task[i]["subject"] for i in range(40)}
    assert len(subjects) > 10  # shuffled across subjects, not sorted by file
    for conversation in task[:50]:
        user, assistant = conversation["messages"]
        assert conversation["letters"] == ["A", "B", "C", "D"]
        assert assistant["content"] in "ABCD" and len(assistant["content"]) == 1
        assert re.search(r"^A\. .*\nB\. .*\nC\. .*\nD\. ", user["content"], re.M | re.S)
        assert task.evaluate(conversation, assistant["content"])
        assert task.evaluate(conversation, " " + assistant["content"] + "\n")
        wrong = next(x for x in "ABCD" if x != assistant["content"])
        assert not task.evaluate(conversation, wrong)
    assert [c["messages"] for c in task[:5]] == [c["messages"] for c in MMLU(split="validation", path=need("mmlu"))[:5]]


def test_mmlu_known_row():
    task = MMLU(split="dev", path=need("mmlu", "dev", "abstract_algebra_dev.csv"), shuffle=False)
    user, assistant = task[0]["messages"]
    assert user["content"] == ("Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\n\n"
                               "A. 0\nB. 1\nC. 2\nD. 3\n\nAnswer with the letter of the correct option.")
    assert assistant["content"] == "B" and task[0]["subject"] == "abstract_algebra"


def write_mmlu_csv(path, questions):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{q},a,b,c,d,A\n" for q in questions))


def test_mmlu_never_reads_another_splits_folder(tmp_path):
    """A Hendrycks folder with only dev/ and val/: asking for a split it lacks is an error (not all
    its CSVs), asking for validation reads val/ alone, and a CSV in another split's folder is refused."""
    root = tmp_path / "mmlu"
    write_mmlu_csv(root / "dev" / "anatomy_dev.csv", ["dev one", "dev two"])
    write_mmlu_csv(root / "val" / "anatomy_val.csv", ["val one", "val two", "val three"])
    for subset, split, folder in (("auxiliary_train", "train", "auxiliary_train"), ("all", "test", "test")):
        with pytest.raises(UserError, match=f"has no {folder}/ folder: it holds val/, dev/"):
            MMLU(subset, split, path=root)
    val = MMLU(split="validation", path=root)
    questions = {c["messages"][0]["content"].split("\n")[0] for c in val}
    assert questions == {"val one", "val two", "val three"} and val[0]["subject"] == "anatomy"
    assert len(MMLU(split="dev", path=root)) == 2
    with pytest.raises(UserError, match="is in a dev/ folder, not test/"):
        MMLU(split="test", path=root / "dev")  # the leaf folder of another split
    with pytest.raises(UserError, match="in a (dev|val)/ folder, not auxiliary_train/"):
        MMLU("auxiliary_train", "train", path=tmp_path)  # split folders one level further down
    write_mmlu_csv(tmp_path / "aux" / "race.csv", ["aux one"])  # a folder of one split's CSVs
    assert len(MMLU("auxiliary_train", "train", path=tmp_path / "aux")) == 1


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_mmlu_hub_rows(tmp_path):
    row = {"question": "2 + 2 = ?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1}
    task = MMLU(path=write_parquet(tmp_path / "all" / "test.parquet", [row]))
    assert task[0]["messages"][1]["content"] == "B" and task[0]["subject"] == "math"
    aux = MMLU("auxiliary_train", "train", path=write_parquet(tmp_path / "aux" / "train.parquet", [{"train": row}]))
    assert aux[0]["messages"] == task[0]["messages"]
    with pytest.raises(ValueError):
        MMLU("auxiliary_train", "test")


def test_arc_both_formats(tmp_path):
    hub = {"id": "q1", "question": "Which is a gas?", "answerKey": "C",
           "choices": {"text": ["rock", "water", "steam"], "label": ["A", "B", "C"]}}
    original = {"id": "q2", "answerKey": "4", "question": {"stem": "Pick four.", "choices": [
        {"text": "one", "label": "1"}, {"text": "two", "label": "2"},
        {"text": "three", "label": "3"}, {"text": "four", "label": "4"}]}}
    task = ARC(path=write_parquet(tmp_path / "arc.parquet", [hub]))
    assert task[0]["letters"] == ["A", "B", "C"] and task[0]["messages"][1]["content"] == "C"
    assert "C. steam" in task[0]["messages"][0]["content"]
    (tmp_path / "ARC-Easy-Test.jsonl").write_text(json.dumps(original) + "\n")
    task = ARC("ARC-Challenge", "test", path=tmp_path / "ARC-Easy-Test.jsonl")
    assert task.name == "ARC-Challenge"
    assert task[0]["messages"][1]["content"] == "D" and "D. four" in task[0]["messages"][0]["content"]
    assert task.evaluate(task[0], "D") and not task.evaluate(task[0], "A")


# ---------------------------------------------------------------------------
# HumanEval, chat, spelling, arithmetic, identity


def test_humaneval_rows_and_evaluate():
    task = HumanEval(path=need("humaneval", "HumanEval_first40.jsonl"), timeout=5)
    assert len(task) == 40 and task.eval_type == "generative"
    conversation = task[2]
    user, assistant = conversation["messages"]
    assert assistant["content"].startswith(user["content"])
    body = assistant["content"][len(user["content"]):]
    assert task.evaluate(conversation, assistant["content"])  # the whole function
    assert task.evaluate(conversation, body)  # just the body, continuing the prompt
    assert task.evaluate(conversation, "Here you go:\n```python\n" + assistant["content"] + "```\nDone.")
    assert not task.evaluate(conversation, "    return 0\n")
    assert not task.evaluate(conversation, "I don't know.")


def test_humaneval_program_building():
    assert extract_code("text\n```py\nx = 1\n```\nmore") == "x = 1\n"
    assert extract_code("```Python\nx = 1\n```") == extract_code("```PY\nx = 1\n```") == "x = 1\n"
    assert extract_code("no fences") == "no fences"
    program = build_program("def f():\n    \"\"\"doc\"\"\"\n", "def f():\n    return 1\n", "def check(c):\n"
                            "    assert c() == 1\n", "f")
    assert program.index("return 1") < program.index("check(f)")


def test_smoltalk_local_formats():
    task = SmolTalk(path=need("chat", "dummy_conversation.json"))
    assert len(task) == 500
    assert task[0]["messages"][0] == {"role": "user", "content": "Who are you?"}
    assert [m["role"] for m in task[2]["messages"]] == ["user", "assistant"] * 3
    assert len(SmolTalk(path=need("chat", "user_oriented_instructions.jsonl"))) == 252


def test_smoltalk_tidy_and_hub_rows(tmp_path):
    messy = [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "stray"},
             {"role": "user", "content": "a"}, {"role": "user", "content": "b"},
             {"role": "assistant", "content": "c"}, {"role": "user", "content": "dangling"}]
    assert tidy(messy) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\n\nb"},
                           {"role": "assistant", "content": "c"}]
    assert tidy([{"role": "user", "content": "only a question"}]) is None
    rows = [{"messages": messy, "source": "x"}, {"messages": [{"role": "user", "content": "hi"},
                                                              {"role": "assistant", "content": "hello"}]}]
    task = SmolTalk(path=write_parquet(tmp_path / "smol.parquet", rows))
    assert len(task) == 2 and task[1]["messages"][1]["content"] == "hello"


BAD_CHAT_ROWS = [
    {"messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hi"}]},  # no reply
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},  # empty reply
    {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "hello"}]},  # no question
    {"messages": None},
    {"text": "a row of some other shape"},
]


def test_smoltalk_drops_unusable_rows_once_when_loading(tmp_path, hub, capsys):
    good = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
            for i in range(3)]
    rows = good[:1] + BAD_CHAT_ROWS + good[1:]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    local = SmolTalk(path=path)
    assert "dropped 5 of 8 rows" in capsys.readouterr().out
    assert [c["messages"] for c in local] == [r["messages"] for r in good]
    # the Hub's parquet (read lazily, row by row): filtered the same way, so get_example never raises
    hub.add_split("HuggingFaceTB/smol-smoltalk", "default", "train", [rows[:4], rows[4:]])
    remote = SmolTalk("train")
    assert "dropped 5 of 8 rows" in capsys.readouterr().out
    assert [c["messages"] for c in remote] == [r["messages"] for r in good]
    (tmp_path / "junk.jsonl").write_text(json.dumps(BAD_CHAT_ROWS[-1]) + "\n")
    with pytest.raises(UserError, match="none of the 1 rows"):
        SmolTalk(path=tmp_path / "junk.jsonl")


def test_spelling_bee_uses_the_tool_correctly():
    task = SpellingBee(size=300)
    assert task.eval_type == "generative"
    zeros = 0
    for conversation in task:
        user, assistant = conversation["messages"]
        text, call, output, final = assistant["content"]
        kinds = (text["type"], call["type"], output["type"], final["type"])
        assert kinds == ("text", "python", "python_output", "text")
        word, letter = re.fullmatch(r"'([a-z]+)'\.count\('([a-z])'\)", call["text"]).groups()
        assert word in user["content"] and output["text"] == str(word.count(letter)) == conversation["answer"]
        assert "-".join(word) in text["text"]
        assert task.evaluate(conversation, final["text"])
        assert not task.evaluate(conversation, f"The letter appears {word.count(letter) + 1} times.")
        zeros += word.count(letter) == 0
    assert 0 < zeros < 150  # some letters absent, most present


def test_simple_spelling():
    task = SimpleSpelling(size=50)
    for conversation in task:
        word = conversation["word"]
        assert conversation["messages"][1]["content"] == f"{word} is spelled {'-'.join(word)}."
        assert task.evaluate(conversation, f"It is {'-'.join(word)}")
        assert not task.evaluate(conversation, f"It is {'-'.join(word[::-1] + 'x')}")


def spelled_word(conversation):
    """The word a SimpleSpelling or SpellingBee example is about (from its answer)."""
    if "word" in conversation:
        return conversation["word"]
    call = conversation["messages"][1]["content"][1]["text"]
    return re.fullmatch(r"'([a-z]+)'\.count\('[a-z]'\)", call).group(1)


def test_spelling_test_words_never_appear_in_training():
    for cls in (SimpleSpelling, SpellingBee):
        train = {spelled_word(c) for c in cls(size=3000, split="train")}
        test = {spelled_word(c) for c in cls(size=300, split="test")}
        assert len(train) > 500 and len(test) > 50
        assert not train & test, cls.__name__
        assert all(zlib.crc32(w.encode()) % 10 == 0 for w in test)
    words = load_words()
    held_out = split_words(words, "test")
    assert 0.05 < len(held_out) / len(words) < 0.15
    assert sorted(held_out + split_words(words, "train")) == words


def test_spelling_split_of_a_tiny_word_list(tmp_path):
    for words in (["ab", "cd"], ["ab", "cd", "ef", "gh", "ij"], sorted(f"w{a}{b}" for a in "abcdefgh" for b in "xyz")):
        train, test = split_words(words, "train"), split_words(words, "test")
        assert train and test and not set(train) & set(test) and sorted(train + test) == words
    (tmp_path / "two.txt").write_text("apple\nbanana\n")
    train = {c["word"] for c in SimpleSpelling(size=20, split="train", words_path=tmp_path / "two.txt")}
    test = {c["word"] for c in SimpleSpelling(size=20, split="test", words_path=tmp_path / "two.txt")}
    assert len(train) == len(test) == 1 and train != test
    (tmp_path / "one.txt").write_text("apple\n")
    with pytest.raises(UserError, match="at least 2 words"):
        SpellingBee(size=5, words_path=tmp_path / "one.txt")


def test_word_lists(tmp_path):
    bundled = load_words()
    assert len(bundled) >= 900 and all(w.isalpha() and w.islower() for w in bundled)
    assert len(load_words(need("words", "words_alpha.zip"))) > 300_000
    (tmp_path / "w.txt").write_text("Apple\nbanana\n\nnot a word\ncherry\n")
    assert load_words(tmp_path / "w.txt") == ["apple", "banana", "cherry"]
    with pytest.raises(UserError, match="does not exist"):
        load_words(tmp_path / "missing.txt")


def test_arithmetic_test_expressions_are_never_trained_on():
    expression = lambda x: x["messages"][1]["content"][1]["text"]  # noqa: E731
    train = {expression(x) for x in Arithmetic(size=3000)}  # what the offline mid stage trains on
    test = {expression(x) for x in Arithmetic(size=256, split="test")}
    assert len(test) > 200 and len(train) > 2000
    assert not train & test


def test_arithmetic_tool_outputs_are_right():
    task = Arithmetic(size=300)
    for conversation in task:
        parts = conversation["messages"][1]["content"]
        call, output = parts[1], parts[2]
        assert call["type"] == "python" and output["type"] == "python_output"
        value = eval(call["text"], {"__builtins__": {}})  # our own generated expressions
        assert value == int(value) and str(int(value)) == output["text"] == conversation["answer"]
        assert task.evaluate(conversation, parts[3]["text"])
        assert not task.evaluate(conversation, f"The answer is {int(value) + 1}.")


def test_identity_default_file():
    task = Identity()
    assert len(task) >= 20
    text = json.dumps([c["messages"] for c in task])
    assert "speedchat" in text and "mistakes" in text
    assert any(isinstance(c["messages"][1]["content"], list) for c in task)  # shows the tool once


# ---------------------------------------------------------------------------
# Downloader against a local server


class Hub:
    """A stand-in for the Hub on 127.0.0.1: the parquet-list API and the files, with
    optional faults (truncated first response, garbage, HTTP errors)."""

    def __init__(self):
        self.files, self.lists, self.requests = {}, {}, []
        self.truncate_once, self.status = set(), {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.requests.append((self.path, self.headers.get("Range")))
                if self.path in hub.status:
                    self.send_error(hub.status[self.path])
                elif self.path in hub.lists:
                    self.reply(json.dumps(hub.lists[self.path]).encode(), "application/json")
                elif self.path in hub.files:
                    self.send_file(hub.files[self.path])
                else:
                    self.send_error(404)

            def reply(self, body, kind, code=200, extra=()):
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                for k, v in extra:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def send_file(self, data):
                start = 0
                if self.headers.get("Range"):
                    start = int(re.match(r"bytes=(\d+)-", self.headers["Range"]).group(1))
                    body = data[start:]
                    extra = [("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")]
                    code = 206
                else:
                    body, extra, code = data, [], 200
                if self.path in hub.truncate_once:
                    hub.truncate_once.discard(self.path)
                    self.send_response(code)
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in extra:
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.reply(body, "application/octet-stream", code, extra)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def add_split(self, repo, config, split, tables):
        urls = []
        for i, rows in enumerate(tables):
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(rows), buf)
            path = f"/files/{repo}/{config}/{split}/{i}.parquet"
            self.files[path] = buf.getvalue()
            urls.append(self.url + path)
        self.lists[f"/api/datasets/{repo}/parquet/{config}/{split}"] = urls
        return urls


@pytest.fixture
def hub(monkeypatch):
    hub = Hub()
    monkeypatch.setenv("SPEEDCHAT_HF_URL", hub.url)
    yield hub
    hub.server.shutdown()
    hub.server.server_close()


GSM_ROWS = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
            for i in range(5)]


def test_download_once_then_cached(hub, base_dir):
    hub.add_split("openai/gsm8k", "main", "test", [GSM_ROWS[:3], GSM_ROWS[3:]])
    task = GSM8K(split="test")
    assert len(task) == 5 and task[4]["answer"] == "8"
    assert task[1]["messages"][1]["content"][1] == {"type": "python", "text": "1+1"}
    folder = base_dir / "tasks_data" / "openai__gsm8k" / "main" / "test"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "0000.parquet", "0001.parquet", "files.json"]
    n = len(hub.requests)
    assert len(GSM8K(split="test")) == 5
    assert len(hub.requests) == n  # second time: no network at all


def test_download_resumes_a_dropped_transfer(hub, base_dir):
    noise = os.urandom(300_000).hex()  # incompressible, so the file spans many read chunks
    (url,) = hub.add_split("openai/openai_humaneval", "openai_humaneval", "test", [[
        {"task_id": "T/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
         "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f", "noise": noise}]])
    path = url[len(hub.url):]
    hub.truncate_once.add(path)
    task = HumanEval()
    assert task[0]["task_id"] == "T/0"
    ranges = [r for p, r in hub.requests if p == path]
    assert len(ranges) == 2 and ranges[0] is None and ranges[1].startswith("bytes=")
    assert int(ranges[1][6:-1]) > 0  # resumed where the dropped transfer stopped
    assert not [p for p in (base_dir / "tasks_data").rglob("*") if p.name.endswith(".tmp")]


def test_download_rejects_garbage(hub, base_dir):
    (url,) = hub.add_split("HuggingFaceTB/smol-smoltalk", "default", "test", [[{"messages": []}]])
    hub.files[url[len(hub.url):]] = b"this is not parquet" * 10
    with pytest.raises(UserError, match="failed after"):
        SmolTalk(split="test")
    assert not list((base_dir / "tasks_data").rglob("*.parquet"))  # nothing half-written is kept


def test_download_http_error_is_one_line(hub):
    hub.status["/api/datasets/allenai/ai2_arc/parquet/ARC-Easy/test"] = 404
    with pytest.raises(UserError) as info:
        ARC("ARC-Easy", "test")
    assert "HTTP 404" in str(info.value) and "--arc-path" in str(info.value) and "\n" not in str(info.value)


def test_offline_fails_fast_naming_the_path_flag(monkeypatch):
    sock = __import__("socket").socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connection refused, like a machine without network
    monkeypatch.setenv("SPEEDCHAT_HF_URL", f"http://127.0.0.1:{port}")
    for make, flag in [(lambda: GSM8K(split="test"), "--gsm8k-path"), (lambda: MMLU(), "--mmlu-path"),
                       (lambda: ARC(), "--arc-path"), (lambda: HumanEval(), "--humaneval-path"),
                       (lambda: SmolTalk(), "--smoltalk-path")]:
        t0 = time.monotonic()
        with pytest.raises(UserError) as info:
            make()
        assert time.monotonic() - t0 < 15  # no retries: 5 with the 2 s doubling backoff would take 30 s
        message = str(info.value)
        assert flag in message and "cannot reach" in message and "\n" not in message


def test_missing_local_path_names_the_flag(tmp_path):
    with pytest.raises(UserError, match="--gsm8k-path"):
        GSM8K(path=tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="--mmlu-path"):
        MMLU(path=tmp_path / "nope")


def test_offline_preset_tasks_need_no_network(monkeypatch):
    monkeypatch.setenv("SPEEDCHAT_HF_URL", "http://127.0.0.1:9")  # would fail if anything tried to download
    mix = TaskMixture([Identity(), SpellingBee(size=20), SimpleSpelling(size=20), Arithmetic(size=20)])
    assert len(mix) == len(Identity()) + 60
    assert all(mix[i]["messages"][-1]["role"] == "assistant" for i in range(len(mix)))
    assert LETTERS.startswith("ABCD")


def test_concurrent_callers_download_once(hub, base_dir):
    hub.add_split("openai/gsm8k", "main", "train", [GSM_ROWS])
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        tasks.common.download_hf_parquet("openai/gsm8k", "main", "train"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r == results[0] for r in results)
    assert sum(p.startswith("/api/") for p, _ in hub.requests) == 1

"""Tasks: real rows rendered through the tokenizer with their loss masks, the tool calls of
GSM8K, spelling and arithmetic, answer extraction, held-out test splits, mixtures and the
downloader against a local 127.0.0.1 server (failing fast when offline)."""

import json
import re
import socket
import threading
import time
import zlib
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tasks.common
from common import UserError
from tasks.arc import ARC
from tasks.arithmetic import Arithmetic
from tasks.common import TaskMixture, check_conversation, last_number, normalize_number
from tasks.gsm8k import GSM8K, extract_answer, solution_parts
from tasks.humaneval import HumanEval, build_program, extract_code
from tasks.identity import Identity
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk, tidy
from tasks.spelling import SimpleSpelling, SpellingBee, load_words, split_words
from tokenizer import Tokenizer

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


@pytest.fixture(scope="module")
def tok():
    texts = [json.dumps(c) for c in Identity()] + load_words() + ["0123456789 + - * / = ( ) ' \" # $ , ."] * 20
    return Tokenizer.train_from_iterator(texts, vocab_size=512)


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
def test_every_task_gives_trainable_conversations(tok, name):
    task = real_tasks()[name]()
    assert len(task) > 0
    for i in range(0, len(task), max(1, len(task) // 7)):
        assert check_conversation(task[i]["messages"]) is None
        ids, mask = tok.render_conversation(task[i], max_tokens=10**9)
        assert 0 < sum(mask) < len(mask)


# ---------------------------------------------------------------------------
# Each task: its examples, its evaluation, its splits


def test_slicing_and_mixtures():
    full = Arithmetic(size=10)
    part = Arithmetic(size=10, start=2, stop=9, step=3)
    assert [c["answer"] for c in part] == [full[i]["answer"] for i in (2, 5, 8)]
    assert part[-1] == full[8] and part[0:2] == [full[2], full[5]]
    assert len(Arithmetic(size=10, start=8, stop=100)) == 2 and len(Arithmetic(size=10, start=12)) == 0
    a, b, c = Arithmetic(size=30), SpellingBee(size=20), Identity()
    first = [m["messages"][0]["content"] for m in TaskMixture([a, b, c], seed=7)]
    assert first == [m["messages"][0]["content"] for m in TaskMixture([a, b, c], seed=7)]
    assert first != [m["messages"][0]["content"] for m in TaskMixture([a, b, c], seed=8)]
    everything = [x["messages"][0]["content"] for t in (a, b, c) for x in t]
    assert sorted(first) == sorted(everything) and first[:10] != everything[:10]  # each once, shuffled
    assert len(TaskMixture([a, a, b])) == 80  # listing a task twice oversamples it
    assert [m["messages"][0]["content"] for m in TaskMixture([a, b, c], seed=7, start=5, stop=15)] == first[5:15]
    for cls in (Arithmetic, SpellingBee, SimpleSpelling):  # generated examples: the same on every run
        assert [x["messages"] for x in cls(size=20)] == [x["messages"] for x in cls(size=20)]
        assert [x["messages"] for x in cls(size=20)] != [x["messages"] for x in cls(size=20, split="test")]
        assert [x["messages"] for x in cls(size=20)] != [x["messages"] for x in cls(size=20, seed=1)]


def test_answers_are_extracted_and_normalized():
    for text, answer in [("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"), ("#### $1,000,000", "1000000"),
                         ("#### -3", "-3"), ("#### 3.50", "3.5"), ("####10.", "10"), ("The answer is 5.", None),
                         ("#### none", None), ("#### 7\nthen rambling #### 9", "7")]:
        assert extract_answer(text) == answer, text
    assert normalize_number("2.0") == "2" and normalize_number("$1,250.50") == "1250.5"
    assert last_number("3 apples and 4.0 pears") == "4" and last_number("none") is None


def test_gsm8k_parts_rebuild_every_real_solution_and_evaluate():
    rows = [json.loads(line) for line in need("gsm8k", "train.jsonl").read_text().splitlines()]
    for row in rows:
        parts, rebuilt = solution_parts(row["answer"]), ""
        for i, part in enumerate(parts):
            assert part["type"] != "python" or parts[i + 1]["type"] == "python_output"
            rebuilt += {"text": part["text"], "python": f"<<{part['text']}=", "python_output": f"{part['text']}>>"}[part["type"]]
        assert rebuilt == row["answer"] and parts[-1]["type"] == "text" and "####" in parts[-1]["text"]
        assert extract_answer(row["answer"]) == normalize_number(row["answer"].split("####")[-1])
    task = GSM8K(path=need("gsm8k", "train.jsonl"))
    conversation = task[0]
    assert len(task) == 7473 and conversation["answer"] == "72" and task.eval_type == "generative"
    assert [p["type"] for p in conversation["messages"][1]["content"]][:3] == ["text", "python", "python_output"]
    assert task.evaluate(conversation, "She sold 72 in all.\n#### 72") and task.evaluate(conversation, "#### 72.00")
    assert not task.evaluate(conversation, "#### 71") and not task.evaluate(conversation, "72")  # no final line


def test_mmlu_real_rows():
    task = MMLU(split="validation", path=need("mmlu"))
    assert len(task) == 1531 and task.eval_type == "categorical"
    assert len(MMLU(split="dev", path=need("mmlu", "dev"))) == 285
    assert len({task[i]["subject"] for i in range(40)}) > 10  # shuffled across subjects, not sorted by file
    for conversation in task[:50]:
        user, assistant = conversation["messages"]
        assert conversation["letters"] == ["A", "B", "C", "D"] and assistant["content"] in ("A", "B", "C", "D")
        assert re.search(r"^A\. .*\nB\. .*\nC\. .*\nD\. ", user["content"], re.M | re.S)
        assert task.evaluate(conversation, " " + assistant["content"] + "\n")
        assert not task.evaluate(conversation, next(x for x in "ABCD" if x != assistant["content"]))
    known = MMLU(split="dev", path=need("mmlu", "dev", "abstract_algebra_dev.csv"), shuffle=False)[0]
    assert known["messages"][0]["content"] == ("Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\n\n"
                                               "A. 0\nB. 1\nC. 2\nD. 3\n\nAnswer with the letter of the correct option.")
    assert known["messages"][1]["content"] == "B" and known["subject"] == "abstract_algebra"


def test_multiple_choice_answer_is_one_supervised_letter_written_as_in_the_prompt(tok):
    conversation = MMLU(split="dev", path=need("mmlu", "dev"))[0]
    ids, mask = tok.render_conversation(conversation)
    supervised = [i for i, m in zip(ids, mask) if m]
    assert len(supervised) == 2 and tok.decode(supervised[:1]) in conversation["letters"]  # + <|assistant_end|>
    prompt = ids[:ids.index(tok.encode_special("<|assistant_start|>"))]
    assert all(tok.encode(letter)[0] in prompt for letter in conversation["letters"])


def write_mmlu_csv(path, questions):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{q},a,b,c,d,A\n" for q in questions))


def test_mmlu_never_reads_another_splits_folder(tmp_path):
    """A Hendrycks folder with only dev/ and val/: a split it lacks is an error (not all its CSVs),
    validation reads val/ alone, and a CSV in another split's folder is refused."""
    root = tmp_path / "mmlu"
    write_mmlu_csv(root / "dev" / "anatomy_dev.csv", ["dev one", "dev two"])
    write_mmlu_csv(root / "val" / "anatomy_val.csv", ["val one", "val two", "val three"])
    val = MMLU(split="validation", path=root)
    assert {c["messages"][0]["content"].split("\n")[0] for c in val} == {"val one", "val two", "val three"}
    assert val[0]["subject"] == "anatomy" and len(MMLU(split="dev", path=root)) == 2
    for subset, split, path in (("auxiliary_train", "train", root), ("all", "test", root),
                                ("all", "test", root / "dev"), ("auxiliary_train", "train", tmp_path)):
        with pytest.raises(UserError):
            MMLU(subset, split, path=path)
    write_mmlu_csv(tmp_path / "aux" / "race.csv", ["aux one"])  # a folder of one split's CSVs
    assert len(MMLU("auxiliary_train", "train", path=tmp_path / "aux")) == 1


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_mmlu_hub_rows_and_arc_in_both_formats(tmp_path):
    row = {"question": "2 + 2 = ?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1}
    task = MMLU(path=write_parquet(tmp_path / "all" / "test.parquet", [row]))
    assert task[0]["messages"][1]["content"] == "B" and task[0]["subject"] == "math"
    aux = MMLU("auxiliary_train", "train", path=write_parquet(tmp_path / "aux" / "train.parquet", [{"train": row}]))
    assert aux[0]["messages"] == task[0]["messages"]
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
    assert task.name == "ARC-Challenge" and "D. four" in task[0]["messages"][0]["content"]
    assert task.evaluate(task[0], "D") and not task.evaluate(task[0], "A")


def test_humaneval_rows_programs_and_evaluate():
    assert extract_code("text\n```py\nx = 1\n```\nmore") == extract_code("```PY\nx = 1\n```") == "x = 1\n"
    assert extract_code("no fences") == "no fences"
    program = build_program("def f():\n    \"\"\"doc\"\"\"\n", "def f():\n    return 1\n", "def check(c):\n"
                            "    assert c() == 1\n", "f")
    assert program.index("return 1") < program.index("check(f)")
    task = HumanEval(path=need("humaneval", "HumanEval_first40.jsonl"), timeout=5)
    assert len(task) == 40 and task.eval_type == "generative"
    conversation = task[2]
    user, assistant = conversation["messages"]
    body = assistant["content"][len(user["content"]):]
    assert assistant["content"].startswith(user["content"])
    assert task.evaluate(conversation, assistant["content"])  # the whole function
    assert task.evaluate(conversation, body)  # just the body, continuing the prompt
    assert task.evaluate(conversation, "Here you go:\n```python\n" + assistant["content"] + "```\nDone.")
    assert not task.evaluate(conversation, "    return 0\n") and not task.evaluate(conversation, "I don't know.")


def test_smoltalk_local_formats_and_tidy():
    task = SmolTalk(path=need("chat", "dummy_conversation.json"))
    assert len(task) == 500 and task[0]["messages"][0] == {"role": "user", "content": "Who are you?"}
    assert [m["role"] for m in task[2]["messages"]] == ["user", "assistant"] * 3
    assert len(SmolTalk(path=need("chat", "user_oriented_instructions.jsonl"))) == 252
    messy = [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "stray"},
             {"role": "user", "content": "a"}, {"role": "user", "content": "b"},
             {"role": "assistant", "content": "c"}, {"role": "user", "content": "dangling"}]
    assert tidy(messy) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\n\nb"},
                           {"role": "assistant", "content": "c"}]
    assert tidy([{"role": "user", "content": "only a question"}]) is None


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
    with pytest.raises(UserError):
        SmolTalk(path=tmp_path / "junk.jsonl")


def test_spelling_tasks_use_the_tool_correctly():
    task = SpellingBee(size=300)
    zeros = 0
    for conversation in task:
        user, assistant = conversation["messages"]
        text, call, output, final = assistant["content"]
        assert (text["type"], call["type"], output["type"], final["type"]) == ("text", "python", "python_output", "text")
        word, letter = re.fullmatch(r"'([a-z]+)'\.count\('([a-z])'\)", call["text"]).groups()
        assert word in user["content"] and output["text"] == str(word.count(letter)) == conversation["answer"]
        assert "-".join(word) in text["text"] and task.evaluate(conversation, final["text"])
        assert not task.evaluate(conversation, f"The letter appears {word.count(letter) + 1} times.")
        zeros += word.count(letter) == 0
    assert 0 < zeros < 150  # some letters absent, most present
    simple = SimpleSpelling(size=50)
    for conversation in simple:
        word = conversation["word"]
        assert conversation["messages"][1]["content"] == f"{word} is spelled {'-'.join(word)}."
        assert simple.evaluate(conversation, f"It is {'-'.join(word)}")
        assert not simple.evaluate(conversation, f"It is {'-'.join(word[::-1] + 'x')}")


def spelled_word(conversation):
    """The word a SimpleSpelling or SpellingBee example is about (from its answer)."""
    if "word" in conversation:
        return conversation["word"]
    return re.fullmatch(r"'([a-z]+)'\.count\('[a-z]'\)", conversation["messages"][1]["content"][1]["text"]).group(1)


def test_spelling_test_words_never_appear_in_training(tmp_path):
    for cls in (SimpleSpelling, SpellingBee):
        train = {spelled_word(c) for c in cls(size=3000, split="train")}
        test = {spelled_word(c) for c in cls(size=300, split="test")}
        assert len(train) > 500 and len(test) > 50 and not train & test, cls.__name__
        assert all(zlib.crc32(w.encode()) % 10 == 0 for w in test)
    words = load_words()
    assert len(words) >= 900 and all(w.isalpha() and w.islower() for w in words)
    assert 0.05 < len(split_words(words, "test")) / len(words) < 0.15
    for words in (["ab", "cd"], ["ab", "cd", "ef", "gh", "ij"], sorted(f"w{a}{b}" for a in "abcdefgh" for b in "xyz")):
        train, test = split_words(words, "train"), split_words(words, "test")
        assert train and test and not set(train) & set(test) and sorted(train + test) == words
    (tmp_path / "w.txt").write_text("Apple\nbanana\n\nnot a word\n")
    assert load_words(tmp_path / "w.txt") == ["apple", "banana"]
    train = {c["word"] for c in SimpleSpelling(size=20, split="train", words_path=tmp_path / "w.txt")}
    test = {c["word"] for c in SimpleSpelling(size=20, split="test", words_path=tmp_path / "w.txt")}
    assert len(train) == len(test) == 1 and train != test
    (tmp_path / "one.txt").write_text("apple\n")
    for path in (tmp_path / "one.txt", tmp_path / "missing.txt"):
        with pytest.raises(UserError):
            SpellingBee(size=5, words_path=path)
    assert len(load_words(need("words", "words_alpha.zip"))) > 300_000


def test_arithmetic_tool_outputs_are_right_and_tests_never_trained_on():
    task = Arithmetic(size=3000)  # what the offline mid stage trains on
    for conversation in task[:300]:
        parts = conversation["messages"][1]["content"]
        call, output = parts[1], parts[2]
        assert call["type"] == "python" and output["type"] == "python_output"
        value = eval(call["text"], {"__builtins__": {}})  # our own generated expressions
        assert value == int(value) and str(int(value)) == output["text"] == conversation["answer"]
        assert task.evaluate(conversation, parts[3]["text"])
        assert not task.evaluate(conversation, f"The answer is {int(value) + 1}.")
    train = {x["messages"][1]["content"][1]["text"] for x in task}
    test = {x["messages"][1]["content"][1]["text"] for x in Arithmetic(size=256, split="test")}
    assert len(test) > 200 and len(train) > 2000 and not train & test


# ---------------------------------------------------------------------------
# Downloader against a local stand-in for the Hub (retries, resume and checksums: test_dataset.py)


class Hub:
    """The Hub's parquet-list API and its files, served from a folder on 127.0.0.1 (a missing file is
    a 404); every request path is logged."""

    def __init__(self, root):
        self.root, self.requests = root, []
        hub = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=root, **kwargs)

            def log_request(self, code="-", size="-"):
                hub.requests.append(self.path)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def add_split(self, repo, config, split, tables):
        files = [write_parquet(self.root / "files" / repo / config / split / f"{i}.parquet", rows)
                 for i, rows in enumerate(tables)]
        listing = self.root / "api" / "datasets" / repo / "parquet" / config / split
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text(json.dumps([f"{self.url}/{f.relative_to(self.root)}" for f in files]))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    hub = Hub(tmp_path / "hub")
    monkeypatch.setenv("SPEEDCHAT_HF_URL", hub.url)
    yield hub
    hub.server.shutdown()
    hub.server.server_close()


GSM_ROWS = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
            for i in range(5)]


def test_download_once_by_one_of_many_callers_then_cached(hub, base_dir):
    hub.add_split("openai/gsm8k", "main", "test", [GSM_ROWS[:3], GSM_ROWS[3:]])
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        tasks.common.download_hf_parquet("openai/gsm8k", "main", "test"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r == results[0] for r in results)
    assert sorted(hub.requests) == ["/api/datasets/openai/gsm8k/parquet/main/test",
                                    "/files/openai/gsm8k/main/test/0.parquet", "/files/openai/gsm8k/main/test/1.parquet"]
    task = GSM8K(split="test")  # from the cache: no request at all
    assert len(task) == 5 and task[4]["answer"] == "8" and len(hub.requests) == 3
    assert task[1]["messages"][1]["content"][1] == {"type": "python", "text": "1+1"}


def test_download_errors_name_the_path_flag(hub, tmp_path, monkeypatch):
    with pytest.raises(UserError) as info:
        ARC("ARC-Easy", "test")
    assert "HTTP 404" in str(info.value) and "--arc-path" in str(info.value) and "\n" not in str(info.value)
    with socket.socket() as sock:  # nothing listens there once closed: like a machine without network
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("SPEEDCHAT_HF_URL", f"http://127.0.0.1:{port}")
    for make, flag in [(lambda: GSM8K(split="test"), "--gsm8k-path"), (lambda: SmolTalk(), "--smoltalk-path"),
                       (lambda: GSM8K(path=tmp_path / "nope.jsonl"), "--gsm8k-path")]:
        t0 = time.monotonic()
        with pytest.raises(UserError, match=flag):
            make()
        assert time.monotonic() - t0 < 15  # no retries: 5 with the 2 s doubling backoff would take 30 s

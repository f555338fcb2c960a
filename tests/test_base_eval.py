"""CORE evaluation (core_eval.py) and the base_eval CLI, with a fake word-level tokenizer and
fake models whose logits are known, so nothing here needs a trained model."""

import bz2
import functools
import http.server
import json
import math
import random
import re
import threading
import zipfile
from pathlib import Path

import pytest
import torch

import base_eval
import core_eval
from common import UserError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BUNDLE, GPT2_BPE, RAW = DATA / "core_eval_bundle", DATA / "gpt2_bpe", DATA / "core_missing"


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDCHAT_BASE_DIR", str(tmp_path / "base"))
    return tmp_path / "base"


class FakeTokenizer:
    """Word level with GPT-2-like splitting (a leading space sticks to the word, a run of spaces
    before a word leaves one for the word); ids handed out on first sight, 0 is BOS."""

    PATTERN = re.compile(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")

    def __init__(self):
        self.vocab = {"<|bos|>": 0}
        self.get_bos_token_id = lambda: 0

    def encode(self, text, prepend=None):
        return [prepend] * (prepend is not None) + [self.vocab.setdefault(p, len(self.vocab))
                                                    for p in self.PATTERN.findall(text)]

    def decode(self, ids):
        pieces = {i: piece for piece, i in self.vocab.items()}
        return "".join(pieces[i] for i in ids)


def marker_model(marker=None, vocab_size=4096):
    """Strongly prefers one token everywhere, so options made of it have the lowest loss; with no
    marker every token is equally likely and every option of an item ties."""
    def model(ids):
        logits = torch.zeros(*ids.shape, vocab_size)
        if marker is not None:
            logits[..., marker] = 10.0
        return logits
    return model


def oracle_model(golds, vocab_size):
    """Knows the gold token sequences: wherever a row agrees with a gold sequence so far, it predicts
    that sequence's next token. The gold option of every item has near-zero loss and is greedily
    reproduced; another option diverges and pays for it."""
    def model(ids):
        logits = torch.zeros(*ids.shape, vocab_size)
        for b, row in enumerate(ids.tolist()):
            best = max(golds, key=lambda g: core_eval.common_prefix_length([row, g]))
            for t in range(min(core_eval.common_prefix_length([row, best]), len(best) - 1)):
                logits[b, t, best[t + 1]] = 10.0
        return logits
    return model


def mc_task(n):
    """A 4-choice task whose gold option is always the words 'zzz zzz' and whose gold index
    cycles through every position (so ties broken by the first option score exactly 1/4)."""
    rows = [{"query": f"Question {i}: which one?", "gold": i % 4,
             "choices": ["zzz zzz" if j == i % 4 else f"option{j} number{i}" for j in range(4)]} for i in range(n)]
    return dict(label="mc", path="unused", type="multiple_choice", num_fewshot=0, delimiter=" ", baseline=0.25), rows


# --- The real bundle (../shared/data): core.yaml, the GPT-2 reference CSVs, prompts

@pytest.fixture(scope="module")
def real():
    if not (BUNDLE / "core.yaml").exists():
        pytest.skip(f"the real CORE eval bundle is not at {BUNDLE}")
    tasks = {t["label"]: t for t in core_eval.load_bundle(BUNDLE)}
    return tasks, {label: core_eval.load_task_data(t) for label, t in tasks.items()}


def test_real_core_yaml_and_the_gpt2_reference_cores(real):
    tasks, _ = real
    assert len(tasks) == 22 and [t["type"] for t in tasks.values()].count("multiple_choice") == 11
    assert (tasks["jeopardy"]["delimiter"], tasks["jeopardy"]["num_fewshot"]) == ("\nAnswer: ", 10)
    assert (tasks["copa"]["delimiter"], tasks["agi_eval_lsat_ar"]["num_fewshot"]) == (" ", 3)
    assert tasks["winogrande"]["type"] == "schema" and tasks["boolq"]["baseline"] == pytest.approx(0.62)
    assert tasks["hellaswag_zeroshot"]["path"] == tasks["hellaswag"]["path"]
    cores = core_eval.reference_cores(BUNDLE)
    for name, core in [("gpt2", 0.113891), ("gpt2-xl", 0.256525)]:
        assert core_eval.read_results_csv(BUNDLE / f"openai-community-{name}.csv")[1] == core
        assert cores[name] == pytest.approx(core, abs=2e-6)  # accuracies are rounded to 6 decimals
    # a partial CORE compares with the mean over the same tasks: GPT-2's boolq 0.552294, copa 0.6
    subset = core_eval.reference_cores(BUNDLE, ["copa", "boolq"])["gpt2"]
    assert subset == pytest.approx(((0.552294 - 0.62) / 0.38 + 0.2) / 2)


def test_render_schema_language_modeling_and_few_shot_draws(real):
    tasks, data = real
    options, gold = core_eval.render_item(tasks["winograd"], data["winograd"], 0)
    assert options == [
        ("The city councilmen refused the demonstrators a permit because the city councilmen ", "feared violence."),
        ("The city councilmen refused the demonstrators a permit because the demonstrators ", "feared violence.")]
    (context, continuation), = core_eval.render_item(tasks["lambada_openai"], data["lambada_openai"], 0)[0]
    assert continuation == " signs"  # the delimiter's space moves over: the context is right-stripped
    assert context == data["lambada_openai"][0]["context"].strip()
    (context, continuation), = core_eval.render_item(tasks["jeopardy"], data["jeopardy"], 0)[0]
    assert continuation == " Admiral Richard Byrd" and context.count("\nAnswer: ") == 10
    assert context.endswith("\n\nWORLD HISTORY: This Navy commander flew from a base at Little America to the "
                            "South Pole & back Nov. 28-29, 1929\nAnswer:")
    # arc_easy as the reference evaluates it: rows shuffled with Random(1337), item 0's ten
    # examples drawn with Random(1234).sample from the other (shuffled) rows
    shuffled = list(data["arc_easy"])
    random.Random(1337).shuffle(shuffled)
    rows = core_eval.task_rows(data["arc_easy"])
    assert rows == shuffled
    options, gold = core_eval.render_item(tasks["arc_easy"], rows, 0)
    picked = random.Random(1234).sample([i for i in range(len(rows)) if i != 0], 10)
    expected = "".join(f"{rows[i]['query']}\nAnswer: {rows[i]['choices'][rows[i]['gold']]}\n\n" for i in picked)
    assert options == [(expected + rows[0]["query"] + "\nAnswer: ", c) for c in rows[0]["choices"]]
    assert gold == rows[0]["gold"]
    assert expected.startswith("Question: The Sun is the largest body in the solar system. The Sun is a ___.\n"
                               "Answer: star\n\n")


@pytest.mark.skipif(not (GPT2_BPE / "gpt2_vocab.json").exists(), reason=f"GPT-2's vocab is not at {GPT2_BPE}")
def test_scored_tokens_with_a_real_bpe(real):
    """GPT-2's BPE (through our Tokenizer): multiple choice scores after the tokens all options
    share (COPA's " she", PIQA's " Blow into"), schema the suffix they share (Winograd's
    " students"), language modeling the continuation with the boundary space folded in."""
    from tokenizer import GPT2_SPLIT_PATTERN, Tokenizer, load_gpt2_encoding

    tok = Tokenizer(load_gpt2_encoding(GPT2_BPE)._mergeable_ranks, GPT2_SPLIT_PATTERN)
    bos, (tasks, data) = tok.get_bos_token_id(), real
    expected = {("copa", 0): [" the toilet filled with water.", " water flowed from the spout."],
                ("copa", 1): [" poured milk in the bowl.", " lost her appetite."],
                ("piqa", 3): [" tin can and tie with rubber band.", " trash bag and tie with rubber band."],
                ("winograd", 40): [" students .", " students ."],
                ("lambada_openai", 0): [" signs"],
                ("bigbench_language_identification", 0): [" A", " B", " C", " D"]}
    for (label, idx), scored in expected.items():
        options, _ = core_eval.render_item(dict(tasks[label], num_fewshot=0), data[label], idx)
        seqs, starts = core_eval.tokenize_item(tok, tasks[label]["type"], options, bos)
        assert [tok.decode(s[st:]) for s, st in zip(seqs, starts)] == scored, label
        assert all(s[0] == bos and tok.decode(s[1:]) == ctx + cont for s, (ctx, cont) in zip(seqs, options))


@pytest.mark.parametrize("label", ["copa", "arc_easy", "boolq", "winograd", "winogrande", "lambada_openai",
                                   "jeopardy", "bigbench_dyck_languages", "bigbench_language_identification"])
def test_oracle_scores_one_on_real_rows_and_uniform_scores_first_option_rate(real, label):
    """Every task type, few-shot prompts included."""
    tasks, data = real
    task, k, tok = tasks[label], 6, FakeTokenizer()
    rows = core_eval.task_rows(data[label], k)
    golds, first_is_gold = [], 0
    for idx in range(k):
        options, gold = core_eval.render_item(task, rows, idx)
        seqs, _ = core_eval.tokenize_item(tok, task["type"], options, 0)
        golds.append(seqs[gold])
        first_is_gold += gold == 0 and task["type"] != "language_modeling"
    V = len(tok.vocab) + 1
    assert core_eval.evaluate_task(oracle_model(golds, V), tok, task, data[label], "cpu", k) == (k, k)
    assert core_eval.evaluate_task(marker_model(vocab_size=V), tok, task, data[label], "cpu", k) == (first_is_gold, k)


@pytest.mark.skipif(not (RAW / "hellaswag_val_full.txt.bz2").exists(), reason=f"no raw HellaSwag/SQuAD in {RAW}")
def test_real_raw_files_convert_to_every_item(base_dir):
    hella, squad = (core_eval.load_task_data({"path": path}) for path in core_eval.convert_missing(RAW))
    assert len(hella) == 10042 and len(squad) == 10570
    assert hella[1]["query"] == "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady"
    assert hella[1]["gold"] == 3 and hella[1]["choices"][3] == "stands and lifts the weight over her head."
    assert squad[2]["continuation"] == "Santa Clara, California"
    assert squad[2]["context"].endswith("Arabic numerals 50.\nQuestion: Where did Super Bowl 50 take place?\nAnswer:")


# --- The reference's rules on hand-built items

def test_scored_tokens_skip_shared_leading_words_and_take_shared_trailing_context():
    tok = FakeTokenizer()
    scored = lambda kind, options: [tok.decode(s[st:])
                                    for s, st in zip(*core_eval.tokenize_item(tok, kind, options, 0))]
    # multiple choice: the words every option starts with are not scored
    mc = [("Pick one: ", "the red ball"), ("Pick one: ", "the red car"), ("Pick one: ", "the blue car")]
    assert scored("multiple_choice", mc) == [" red ball", " red car", " blue car"]
    # schema: the context token every option ends with is scored with the continuation
    schema = [("The trophy did not fit in the case because the trophy was ", "too big."),
              ("The trophy did not fit in the case because the case was ", "too big.")]
    assert scored("schema", schema) == [" was too big."] * 2
    # language modeling: the continuation, with the boundary space merged into its first token
    assert scored("language_modeling", [("The country of Novosibirsk is", " Russia")]) == [" Russia"]


def test_long_prompts_go_in_whole():
    tok = FakeTokenizer()
    words = ["w" + "".join(chr(97 + i // 26**p % 26) for p in range(3)) for i in range(3000)]  # one token each
    options = [(" ".join(words) + " ", "final answer"), (" ".join(words) + " ", "other")]
    seqs, _ = core_eval.tokenize_item(tok, "multiple_choice", options, 0)
    assert [len(s) for s in seqs] == [3003, 3002] and seqs[0][0] == 0  # BOS + 3000 words + the option
    lengths = []  # our GPT takes the whole prompt (its rotary tables grow): no cut anywhere
    core_eval.evaluate_task(lambda ids: lengths.append(ids.shape[1]) or torch.zeros(*ids.shape, 4096), tok,
                            mc_task(1)[0], [{"query": " ".join(words), "choices": ["a", "b"], "gold": 0}], "cpu")
    assert lengths == [3002]


def test_items_and_few_shot_examples_follow_random_1337_then_1234_plus_idx():
    data = [{"i": i} for i in range(10)]
    assert [r["i"] for r in core_eval.task_rows(data)] == [0, 3, 7, 2, 1, 6, 4, 5, 8, 9]
    rows = core_eval.task_rows(data, 4)  # shuffled, then cut: the examples come from these 4 rows
    assert [r["i"] for r in rows] == [0, 3, 7, 2]
    assert [[ex["i"] for ex in core_eval.fewshot_examples(rows, idx, 2)] for idx in range(4)] == \
        [[7, 3], [2, 7], [2, 3], [0, 3]]
    assert len(core_eval.fewshot_examples(rows, 2, 10)) == 3  # capped at the other rows
    for n, idx, k in [(5, 0, 4), (100, 37, 10), (2376, 2375, 10), (20321, 5, 10)]:  # the reference's plain list
        plain = random.Random(1234 + idx).sample([i for i in range(n) if i != idx], k)
        assert core_eval.fewshot_examples(list(range(n)), idx, k) == plain


def test_scores_of_models_that_prefer_gold_avoid_it_or_are_uniform():
    task, rows = mc_task(40)
    tok = FakeTokenizer()
    zzz = tok.encode(" zzz")[0]
    assert core_eval.evaluate_task(marker_model(zzz), tok, task, rows, "cpu") == (40, 40)
    # uniform logits: every option ties, the first wins; gold cycles, so accuracy is exactly 1/4
    result = core_eval.task_result(task, *core_eval.evaluate_task(marker_model(), tok, task, rows, "cpu"))
    assert result["accuracy"] == 0.25 and result["centered"] == 0.0
    assert result["accuracy_se"] == pytest.approx(math.sqrt(0.25 * 0.75 / 40))
    # a model that avoids gold scores 0 and a negative centered accuracy
    correct, n = core_eval.evaluate_task(marker_model(tok.encode(" option")[0]), tok, task, rows, "cpu", 20)
    assert (correct, n) == (0, 20) and core_eval.task_result(task, correct, n)["centered"] == pytest.approx(-1 / 3)
    # ranks (no process group here: each rank's own share) take every item once
    assert [core_eval.evaluate_task(marker_model(zzz), tok, task, rows[:13], "cpu", rank=r, world_size=3)
            for r in range(3)] == [(5, 5), (4, 4), (4, 4)]
    # language modeling needs every continuation token greedily: "zzz yyy" misses its last one
    lm = dict(task, type="language_modeling", num_fewshot=2, baseline=0.0)
    rows = [{"context": f"Item {i} says", "continuation": "zzz zzz" if i % 2 == 0 else "zzz yyy"} for i in range(10)]
    assert core_eval.evaluate_task(marker_model(zzz), tok, lm, rows, "cpu") == (5, 10)
    assert core_eval.evaluate_task(marker_model(), tok, lm, rows, "cpu") == (0, 10)


# --- A synthetic bundle: missing tasks, converted tasks, the CORE line, the CSV, the download

def make_bundle(root: Path) -> Path:
    (root / "eval_data" / "x").mkdir(parents=True)
    (root / "core.yaml").write_text(
        "icl_tasks:\n"
        "-\n  label: mc\n  dataset_uri: x/mc.jsonl\n  num_fewshot: [1]\n  icl_task_type: multiple_choice\n"
        "-\n  label: lm\n  dataset_uri: x/lm.jsonl\n  num_fewshot: [0]\n  icl_task_type: language_modeling\n"
        '  continuation_delimiter: "\\nAnswer: "\n'
        "-\n  label: gone\n  dataset_uri: reading_comprehension/squad.jsonl\n  num_fewshot: [0]\n"
        "  icl_task_type: language_modeling\n")
    (root / "eval_meta_data.csv").write_text(
        'Eval Task,Task Category,Random baseline,Description\nmc,a,25,"has, commas"\nlm,b,0,x\ngone,c,0,y\n')
    lm = [{"context": f"Q{i}", "continuation": "zzz"} for i in range(6)]
    for name, rows in (("mc", mc_task(8)[1]), ("lm", lm)):
        (root / "eval_data" / "x" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_run_core_reports_missing_tasks_and_a_partial_core(tmp_path, capsys):
    with pytest.raises(UserError):
        core_eval.load_bundle(tmp_path)  # no core.yaml
    bundle = make_bundle(tmp_path / "bundle")
    assert core_eval.load_bundle(bundle)[1]["delimiter"] == "\nAnswer: "
    tok = FakeTokenizer()
    results, summary = core_eval.run_core(marker_model(tok.encode(" zzz")[0]), tok, bundle, "cpu", progress=False)
    assert results["gone"]["missing"] and results["mc"]["accuracy"] == 1.0 and results["lm"]["n"] == 6
    assert summary["partial"] and summary["tasks"] == ["mc", "lm"] and summary["missing"] == ["gone"]
    assert summary["core"] == pytest.approx(1.0) and summary["core_se"] == 0.0
    line = core_eval.core_line(summary, 3)
    assert "PARTIAL" in line and "2 of 3" in line and "gone" in line and "APPROXIMATE" not in line
    assert "MISSING" in capsys.readouterr().out
    core_eval.write_core_csv(tmp_path / "out" / "core.csv", results, summary)
    assert core_eval.read_results_csv(tmp_path / "out" / "core.csv") == ({"mc": 1.0, "lm": 1.0}, 1.0)
    # the standard error of CORE: the tasks' centered errors, added in quadrature, over their count
    summary = core_eval.core_summary({"a": dict(centered=0.2, centered_se=0.03),
                                      "b": dict(centered=0.4, centered_se=0.04)})
    assert summary["core"] == pytest.approx(0.3) and summary["core_se"] == pytest.approx(0.05 / 2)
    r = core_eval.task_result(dict(type="multiple_choice", num_fewshot=0, baseline=0.62), 60, 100)
    assert r["centered_se"] == pytest.approx(math.sqrt(0.6 * 0.4 / 100) / 0.38)


def test_converted_tasks_fill_in_for_missing_files_and_are_marked(tmp_path, base_dir):
    raw = tmp_path / "raw"
    raw.mkdir()
    with bz2.open(raw / "hellaswag_val_full.txt.bz2", "wt") as f:  # six lines per item
        f.write("Roof shingle removal: A man is on a roof. he\n1\nskis.\nstarts.\nc\nd\nJump: A Boy.\n0\na\nb\nc\nd\n")
    with zipfile.ZipFile(raw / "dev-v1.1.json.zip", "w") as zf:
        zf.writestr("dev-v1.1.json", json.dumps({"data": [{"paragraphs": [{"context": "Paris is in France.", "qas": [
            {"question": "Where is Paris?", "answers": [{"text": "France"}, {"text": "in France"}]}]}]}]}))
    base_eval.main(["--convert-missing", str(raw)])
    hella, squad = (core_eval.load_task_data({"path": base_dir / "core_converted" / name})
                    for name in core_eval.CONVERTERS)
    assert hella == [{"query": "Roof shingle removal: A man is on a roof. He", "gold": 1,
                      "choices": ["skis.", "starts.", "c", "d"], "converted": "hellaswag_val_full.txt.bz2"},
                     {"query": "Jump: A Boy.", "choices": ["a", "b", "c", "d"], "gold": 0,
                      "converted": "hellaswag_val_full.txt.bz2"}]
    assert [(r["context"], r["continuation"]) for r in squad] == [
        ("Context: Paris is in France.\nQuestion: Where is Paris?\nAnswer:", "France")]
    bundle = make_bundle(tmp_path / "bundle")  # its task "gone" is squad.jsonl, which the bundle lacks
    results, summary = core_eval.run_core(marker_model(), FakeTokenizer(), bundle, "cpu", progress=False)
    assert results["gone"]["n"] == 1 and not summary["partial"] and summary["approximate"] == ["gone"]
    assert "APPROXIMATE: gone" in core_eval.core_line(summary, 3)
    own = bundle / "eval_data" / "reading_comprehension" / "squad.jsonl"  # the bundle's own file wins
    own.parent.mkdir()
    own.write_text('{"context": "Q", "continuation": "A"}\n')
    assert core_eval.load_bundle(bundle)[2]["path"] == own


@pytest.mark.parametrize("layout", ["top folder", "flat", "not a zip"])
def test_bundle_downloads_once_and_unzips_atomically(tmp_path, monkeypatch, base_dir, layout):
    root = tmp_path / "www"
    bundle = make_bundle(tmp_path / "src" / "eval_bundle")
    root.mkdir()
    with zipfile.ZipFile(root / "eval_bundle.zip", "w") as zf:  # the real zip has an eval_bundle/ folder
        for path in bundle.rglob("*"):
            zf.write(path, path.relative_to(bundle.parent if layout == "top folder" else bundle))
    if layout == "not a zip":
        (root / "eval_bundle.zip").write_bytes(b"not a zip")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        monkeypatch.setenv(core_eval.BUNDLE_URL_ENV, f"{url}/eval_bundle.zip")
        if layout == "not a zip":
            with pytest.raises(UserError):
                core_eval.ensure_bundle()
            assert not (base_dir / "eval_bundle").exists() and not (base_dir / "eval_bundle.zip").exists()
            return
        dest = core_eval.ensure_bundle()
        assert dest == base_dir / "eval_bundle" and (dest / "eval_data" / "x" / "mc.jsonl").exists()
        assert [t["label"] for t in core_eval.load_bundle(dest)] == ["mc", "lm", "gone"]
        assert not (base_dir / "eval_bundle.zip").exists()
        monkeypatch.setenv(core_eval.BUNDLE_URL_ENV, f"{url}/nothing-here.zip")
        assert core_eval.ensure_bundle() == dest  # already there: no download
    finally:
        httpd.shutdown()


# --- base_eval end to end

@pytest.mark.slow  # builds a real (tiny) GPT: the first model import pays for torch's lazy imports
def test_main_end_to_end_on_a_tiny_model(tmp_path, base_dir, capsys):
    """A random tiny GPT (bytes-only tokens) through the whole CLI: CORE on a synthetic bundle, bpb,
    samples, the report section."""
    from test_checkpoint import save_gpt

    with pytest.raises(UserError):
        base_eval.main(["--device", "cpu", "--eval", "sample"])  # no checkpoint yet
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(40):
        (texts / f"{i}.txt").write_text(f"Document {i}. " + "Some words about nothing in particular. " * 20)
    save_gpt(base_dir, source=f"dir:{texts}")

    bundle = make_bundle(tmp_path / "bundle")
    base_eval.main(["--device", "cpu", "--bundle", str(bundle), "--split-tokens", "256", "--device-batch-size", "2"])
    out = capsys.readouterr().out
    assert "CORE: " in out and "PARTIAL" in out and "val bpb" in out
    accuracies, stated = core_eval.read_results_csv(base_dir / "base_eval" / "core_d2_5.csv")
    assert set(accuracies) == {"mc", "lm"} and stated is not None
    data = json.loads((base_dir / "report" / "base-eval.json").read_text())
    assert data["step"] == 5 and data["tag"] == "d2" and data["missing_tasks"] == ["gone"]
    assert data["results"]["mc"]["n"] == 8 and data["results"]["lm"]["n"] == 6
    assert data["core"] == pytest.approx((data["results"]["mc"]["centered"] + data["results"]["lm"]["centered"]) / 2)
    # bytes-only tokens (1 byte each) and a near-zero lm_head: near-uniform logits over the 265-token
    # vocab, so the loss is ~ln(265) nats per token = log2(265) ~ 8.05 bits per byte
    for split in ("train", "val"):
        assert data["bpb"][split] == pytest.approx(math.log2(265), rel=0.02), split
    assert len(data["samples"]) == len(base_eval.SAMPLE_PROMPTS)
    assert data["samples"][0].startswith("The capital of France is")
    text = (base_dir / "report" / "base-eval.md").read_text()
    assert "PARTIAL" in text and "| gone |" in text and f"val bpb: {data['bpb']['val']:.4f}" in text
    # without --split-tokens a CPU evaluates 32,768 tokens per split (the d20 amount would take minutes)
    base_eval.main(["--device", "cpu", "--eval", "bpb", "--device-batch-size", "8"])
    assert "(32,768 tokens of dir:" in capsys.readouterr().out

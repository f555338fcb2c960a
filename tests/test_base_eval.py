"""CORE evaluation (core_eval.py) and the base_eval CLI, with a fake word-level tokenizer and
fake models whose logits are known, so nothing here needs a trained model."""

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

BUNDLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "core_eval_bundle"
needs_bundle = pytest.mark.skipif(not (BUNDLE / "core.yaml").exists(),
                                  reason=f"the real CORE eval bundle is not at {BUNDLE}")


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDCHAT_BASE_DIR", str(tmp_path / "base"))
    return tmp_path / "base"


# ---------------------------------------------------------------------------
# Fakes


class FakeTokenizer:
    """Word level with GPT-2-like splitting (a leading space sticks to the word, a run of spaces
    before a word leaves one for the word); ids handed out on first sight, 0 is BOS."""

    PATTERN = re.compile(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")

    def __init__(self):
        self.vocab = {"<|bos|>": 0}
        self.inverse = ["<|bos|>"]

    def get_bos_token_id(self):
        return 0

    def _id(self, piece):
        if piece not in self.vocab:
            self.vocab[piece] = len(self.inverse)
            self.inverse.append(piece)
        return self.vocab[piece]

    def encode(self, text, prepend=None):
        return ([] if prepend is None else [prepend]) + [self._id(p) for p in self.PATTERN.findall(text)]

    def decode(self, ids):
        return "".join(self.inverse[i] for i in ids)


class UniformModel:
    """Every token equally likely: every option of an item ties."""

    def __init__(self, vocab_size=4096):
        self.V = vocab_size

    def __call__(self, ids):
        return torch.zeros(*ids.shape, self.V)


class MarkerModel:
    """Strongly prefers one token everywhere: options made of it have the lowest loss."""

    def __init__(self, marker, vocab_size=4096):
        self.marker, self.V = marker, vocab_size

    def __call__(self, ids):
        logits = torch.zeros(*ids.shape, self.V)
        logits[..., self.marker] = 10.0
        return logits


class OracleModel:
    """Knows the gold token sequences: wherever a row agrees with a gold sequence so far, it
    predicts that sequence's next token. The gold option of every item has near-zero loss and is
    greedily reproduced; another option diverges and pays for it."""

    def __init__(self, golds, vocab_size):
        self.golds, self.V = [list(g) for g in golds], vocab_size

    def __call__(self, ids):
        logits = torch.zeros(*ids.shape, self.V)
        for b, row in enumerate(ids.tolist()):
            best = max(self.golds, key=lambda g: core_eval.common_prefix_length(row, g))
            agree = core_eval.common_prefix_length(row, best)
            for t in range(min(agree, len(best) - 1)):
                logits[b, t, best[t + 1]] = 10.0
        return logits


def mc_task(n, num_choices=4, label="synthetic_mc", baseline=0.25, shots=0):
    """A multiple-choice task whose gold option is always the word 'zzz' and whose gold index
    cycles through every position (so ties broken by the first option score exactly 1/k)."""
    rows = []
    for i in range(n):
        gold = i % num_choices
        choices = [f"option{j} number{i}" for j in range(num_choices)]
        choices[gold] = "zzz zzz"
        rows.append({"query": f"Question {i}: which one?", "choices": choices, "gold": gold})
    task = dict(label=label, path="unused", type="multiple_choice", num_fewshot=shots, delimiter=" ", baseline=baseline)
    return task, rows


# ---------------------------------------------------------------------------
# core.yaml, baselines, the reference CSVs


@needs_bundle
def test_real_core_yaml_and_baselines():
    tasks = core_eval.load_bundle(BUNDLE)
    assert len(tasks) == 22
    by_label = {t["label"]: t for t in tasks}
    assert by_label["jeopardy"]["delimiter"] == "\nAnswer: " and by_label["jeopardy"]["num_fewshot"] == 10
    assert by_label["copa"]["delimiter"] == " " and by_label["copa"]["num_fewshot"] == 0
    assert by_label["agi_eval_lsat_ar"]["num_fewshot"] == 3
    assert by_label["winogrande"]["type"] == "schema"
    assert by_label["lambada_openai"]["type"] == "language_modeling"
    assert by_label["boolq"]["baseline"] == pytest.approx(0.62)
    assert by_label["bigbench_language_identification"]["baseline"] == pytest.approx(0.091)
    assert by_label["hellaswag_zeroshot"]["path"] == by_label["hellaswag"]["path"]
    assert sum(t["type"] == "multiple_choice" for t in tasks) == 11
    assert sum(t["type"] == "language_modeling" for t in tasks) == 9


def test_yaml_parser_forms_and_errors():
    text = 'icl_tasks:\n# comment\n- label: a\n  num_fewshot: [3]\n  continuation_delimiter: "\\nA: "\n' \
           "-\n  label: 'b'\n  has_categories: true\n  x: 1.5\n"
    assert core_eval.parse_core_yaml(text) == [
        {"label": "a", "num_fewshot": [3], "continuation_delimiter": "\nA: "},
        {"label": "b", "has_categories": True, "x": 1.5}]
    with pytest.raises(UserError, match="line 2"):
        core_eval.parse_core_yaml("icl_tasks:\n  label: a\n")


@needs_bundle
@pytest.mark.parametrize("name, core", [("openai-community-gpt2.csv", 0.113891),
                                        ("openai-community-gpt2-xl.csv", 0.256525)])
def test_gpt2_reference_csv_gives_its_core(name, core):
    computed, per_task, stated = core_eval.reference_core(BUNDLE / name, BUNDLE / "eval_meta_data.csv")
    assert stated == core
    assert len(per_task) == 22
    assert computed == pytest.approx(core, abs=2e-6)  # accuracies are rounded to 6 decimals
    # on a subset of tasks (a partial CORE): the mean of those tasks' centered values only
    subset, _, _ = core_eval.reference_core(BUNDLE / name, BUNDLE / "eval_meta_data.csv", ["copa", "boolq"])
    assert subset == pytest.approx((per_task["copa"] + per_task["boolq"]) / 2)
    if name == "openai-community-gpt2.csv":  # two hand-checked centered values
        assert per_task["boolq"] == pytest.approx((0.552294 - 0.62) / 0.38)
        assert per_task["copa"] == pytest.approx(0.2)


# ---------------------------------------------------------------------------
# Prompt rendering on real rows


@pytest.fixture(scope="module")
def real():
    if not (BUNDLE / "core.yaml").exists():
        pytest.skip(f"the real CORE eval bundle is not at {BUNDLE}")
    tasks = {t["label"]: t for t in core_eval.load_bundle(BUNDLE)}
    return tasks, {label: core_eval.load_task_data(t) for label, t in tasks.items()}


def test_render_multiple_choice_zero_shot(real):
    tasks, data = real
    options, gold = core_eval.render_item(tasks["copa"], data["copa"], 0)
    assert options == [("The man turned on the faucet, therefore ", "the toilet filled with water."),
                       ("The man turned on the faucet, therefore ", "water flowed from the spout.")]
    assert gold == 1


def test_render_multiple_choice_few_shot(real):
    tasks, data = real
    options, gold = core_eval.render_item(tasks["arc_easy"], data["arc_easy"], 0)
    assert gold == 0 and len(options) == 4
    context = options[0][0]
    assert all(ctx == context for ctx, _ in options)
    assert [cont for _, cont in options] == data["arc_easy"][0]["choices"]
    # the first of 10 examples drawn with random.Random(1234 + 0) from the other 2375 rows is row 1806
    assert context.startswith("Question: The first telescopes were invented hundreds of years ago. Which was "
                              "discovered as a result of this invention?\nAnswer: the moons of Jupiter\n\n"
                              "Question: Some birds fly south in the fall and return in the spring. This is an "
                              "example of\nAnswer: migration\n\n")
    assert context.endswith("\n\nQuestion: Which statement best explains why photosynthesis is the foundation of "
                            "most food webs?\nAnswer: ")
    assert context.count("\n\nQuestion: ") == 10
    picked = random.Random(1234).sample([i for i in range(len(data["arc_easy"])) if i != 0], 10)
    expected = "".join(f"{data['arc_easy'][i]['query']}\nAnswer: "
                       f"{data['arc_easy'][i]['choices'][data['arc_easy'][i]['gold']]}\n\n" for i in picked)
    assert context == expected + data["arc_easy"][0]["query"] + "\nAnswer: "


def test_render_schema(real):
    tasks, data = real
    options, gold = core_eval.render_item(tasks["winograd"], data["winograd"], 0)
    assert options == [
        ("The city councilmen refused the demonstrators a permit because the city councilmen ", "feared violence."),
        ("The city councilmen refused the demonstrators a permit because the demonstrators ", "feared violence.")]
    assert gold == 0


def test_render_language_modeling(real):
    tasks, data = real
    (context, continuation), = core_eval.render_item(tasks["lambada_openai"], data["lambada_openai"], 0)[0]
    assert continuation == " signs"  # the delimiter's space moves over: the context is right-stripped
    assert context.endswith("his mouth curved in a confident grin, I don't care about")
    assert context == data["lambada_openai"][0]["context"].strip()

    (context, continuation), = core_eval.render_item(tasks["jeopardy"], data["jeopardy"], 0)[0]
    assert continuation == " Admiral Richard Byrd"
    assert context.startswith("WORD ORIGINS: This word for a cantankerous personality is a variation of "
                              "ordinary\nAnswer: ornery\n\nAMERICAN HISTORY: In 1888 he won the presidency")
    assert context.endswith("\n\nWORLD HISTORY: This Navy commander flew from a base at Little America to the "
                            "South Pole & back Nov. 28-29, 1929\nAnswer:")
    assert context.count("\nAnswer: ") == 10


GPT2_BPE = BUNDLE.parent / "gpt2_bpe"


@pytest.mark.skipif(not (GPT2_BPE / "gpt2_vocab.json").exists(), reason=f"GPT-2's vocab is not at {GPT2_BPE}")
def test_continuation_tokens_with_a_real_bpe(real):
    """GPT-2's BPE (through our Tokenizer): the scored tokens are exactly the continuation, with
    the boundary space folded into the first word the way the tokenizer splits it."""
    from tokenizer import GPT2_SPLIT_PATTERN, Tokenizer, load_gpt2_encoding

    tok = Tokenizer(load_gpt2_encoding(GPT2_BPE)._mergeable_ranks, GPT2_SPLIT_PATTERN)
    bos = tok.get_bos_token_id()
    tasks, data = real
    expected = {"copa": [" the toilet filled with water.", " water flowed from the spout."],
                "winograd": [" feared violence.", " feared violence."],
                "lambada_openai": [" signs"],
                "jeopardy": [" Admiral Richard Byrd"],
                "arc_easy": [" " + c for c in data["arc_easy"][0]["choices"]],
                # its query ends in a space: the context ends ":", " ", " " and the first " " is shared
                "bigbench_language_identification": [" A", " B", " C", " D"]}
    for label, continuations in expected.items():
        options, _ = core_eval.render_item(tasks[label], data[label], 0)
        seqs, starts = core_eval.tokenize_options(tok, options, bos, 4096)
        assert [tok.decode(s[st:]) for s, st in zip(seqs, starts)] == continuations, label
        assert all(s[0] == bos and tok.decode(s[1:]) == ctx + cont for s, (ctx, cont) in zip(seqs, options))


def test_fewshot_draws_match_the_plain_list_and_exclude_the_item():
    for n, idx, k in [(5, 0, 4), (100, 37, 10), (2376, 2375, 10), (20321, 5, 10)]:
        rng_a, rng_b = random.Random(1234 + idx), random.Random(1234 + idx)
        assert rng_a.sample(core_eval._AllBut(n, idx), k) == rng_b.sample([i for i in range(n) if i != idx], k)
    data = [{"i": i} for i in range(4)]
    assert len(core_eval.fewshot_examples(data, 2, 10)) == 3  # capped at the other rows
    assert {"i": 2} not in core_eval.fewshot_examples(data, 2, 10)


# ---------------------------------------------------------------------------
# Tokens


def test_continuation_tokens_follow_the_word_boundary():
    tok = FakeTokenizer()
    seqs, starts = core_eval.tokenize_options(tok, [("the faucet, therefore ", "the toilet"),
                                                     ("the faucet, therefore ", "water")], 0, 100)
    assert [tok.decode(s[st:]) for s, st in zip(seqs, starts)] == [" the toilet", " water"]  # not " " + "the"
    assert all(s[0] == 0 for s in seqs)
    seqs, starts = core_eval.tokenize_options(tok, [("The country of Novosibirsk is", " Russia")], 0, 100)
    assert tok.decode(seqs[0][starts[0]:]) == " Russia" and starts[0] == len(seqs[0]) - 1


def test_long_prompts_are_cut_from_the_left_keeping_bos_and_continuation():
    tok = FakeTokenizer()
    words = ["w" + "".join(chr(97 + int(d)) for d in str(i)) for i in range(50)]  # one token each: wa, wb, ...
    context = " ".join(words) + " "
    seqs, starts = core_eval.tokenize_options(tok, [(context, "final answer")], 0, 10)
    assert len(seqs[0]) == 10 and seqs[0][0] == 0
    assert tok.decode(seqs[0][starts[0]:]) == " final answer"
    assert tok.decode(seqs[0][1:starts[0]]).split() == words[-7:]


# ---------------------------------------------------------------------------
# Scoring with fake models


def test_model_that_prefers_gold_scores_one_and_uniform_scores_the_baseline():
    task, rows = mc_task(40)
    tok = FakeTokenizer()
    marker = tok.encode(" zzz")[0]
    correct, n = core_eval.evaluate_task(MarkerModel(marker), tok, task, rows, "cpu", 64)
    assert (correct, n) == (40, 40)
    # uniform logits: every option ties, the first wins; gold cycles, so accuracy is exactly 1/4
    correct, n = core_eval.evaluate_task(UniformModel(), tok, task, rows, "cpu", 64)
    result = core_eval.task_result(task, correct, n)
    assert result["accuracy"] == 0.25 and result["centered"] == 0.0
    assert result["accuracy_se"] == pytest.approx(math.sqrt(0.25 * 0.75 / 40))
    # a model that avoids gold scores 0 and a negative centered accuracy
    avoid = MarkerModel(tok.encode(" option")[0])
    correct, n = core_eval.evaluate_task(avoid, tok, task, rows, "cpu", 64)
    assert correct == 0 and core_eval.task_result(task, correct, n)["centered"] == pytest.approx(-1 / 3)


def test_uniform_model_is_at_chance_when_gold_is_random():
    """With gold drawn at random, uniform logits score the baseline within the standard error."""
    task, rows = mc_task(400, num_choices=2, baseline=0.5)
    rng = random.Random(0)
    for row in rows:  # move the gold "zzz zzz" to a random position
        gold = rng.randrange(2)
        row["choices"][row["gold"]], row["choices"][gold] = row["choices"][gold], row["choices"][row["gold"]]
        row["gold"] = gold
    correct, n = core_eval.evaluate_task(UniformModel(), FakeTokenizer(), task, rows, "cpu", 64)
    result = core_eval.task_result(task, correct, n)
    assert abs(result["centered"]) < 3 * result["centered_se"]


def test_language_modeling_needs_every_token_greedily():
    tok = FakeTokenizer()
    z = tok.encode(" zzz")[0]
    task = dict(label="lm", path="unused", type="language_modeling", num_fewshot=2, delimiter=" ", baseline=0.0)
    rows = [{"context": f"Item {i} says", "continuation": "zzz zzz" if i % 2 == 0 else "zzz yyy"} for i in range(10)]
    correct, n = core_eval.evaluate_task(MarkerModel(z), tok, task, rows, "cpu", 64)
    assert (correct, n) == (5, 10)  # "zzz yyy" misses its last token
    assert core_eval.evaluate_task(UniformModel(), tok, task, rows, "cpu", 64) == (0, 10)


@needs_bundle
@pytest.mark.parametrize("label", ["copa", "arc_easy", "boolq", "winograd", "winogrande", "lambada_openai",
                                   "jeopardy", "bigbench_dyck_languages", "bigbench_language_identification"])
def test_oracle_scores_one_on_real_rows_and_uniform_scores_first_option_rate(real, label):
    """Every task type, few-shot and truncated prompts included (max_len 192)."""
    tasks, data = real
    task, rows, max_len, k = tasks[label], data[label], 192, 6
    tok = FakeTokenizer()
    golds, first_is_gold = [], 0
    for idx in core_eval.eval_indices(len(rows), k):
        options, gold = core_eval.render_item(task, rows, idx)
        seqs, _ = core_eval.tokenize_options(tok, options, 0, max_len)
        assert max(len(s) for s in seqs) <= max_len
        golds.append(seqs[gold])
        first_is_gold += gold == 0 and task["type"] != "language_modeling"
    V = len(tok.vocab) + 1
    assert core_eval.evaluate_task(OracleModel(golds, V), tok, task, rows, "cpu", max_len, k) == (k, k)
    assert core_eval.evaluate_task(UniformModel(V), tok, task, rows, "cpu", max_len, k) == (first_is_gold, k)


def test_ranks_split_the_items_and_cover_them_once():
    task, rows = mc_task(13)
    tok = FakeTokenizer()
    marker = tok.encode(" zzz")[0]
    counts = [core_eval.evaluate_task(MarkerModel(marker), tok, task, rows, "cpu", 64, rank=r, world_size=3)
              for r in range(3)]  # no process group: each rank's own share
    assert counts == [(5, 5), (4, 4), (4, 4)]
    assert core_eval.eval_indices(100, 10) == core_eval.eval_indices(100, 10) != list(range(10))
    assert core_eval.eval_indices(5, 10) == list(range(5))


# ---------------------------------------------------------------------------
# A synthetic bundle end to end: missing tasks, the partial CORE line, the CSV


def make_bundle(root: Path, with_lm=True) -> Path:
    (root / "eval_data" / "x").mkdir(parents=True)
    (root / "core.yaml").write_text(
        "icl_tasks:\n"
        "-\n  label: mc\n  dataset_uri: x/mc.jsonl\n  num_fewshot: [1]\n  icl_task_type: multiple_choice\n"
        "-\n  label: lm\n  dataset_uri: x/lm.jsonl\n  num_fewshot: [0]\n  icl_task_type: language_modeling\n"
        '  continuation_delimiter: "\\nAnswer: "\n'
        "-\n  label: gone\n  dataset_uri: x/gone.jsonl\n  num_fewshot: [0]\n  icl_task_type: schema\n")
    (root / "eval_meta_data.csv").write_text(
        'Eval Task,Task Category,Random baseline,Description\nmc,a,25,"has, commas"\nlm,b,0,x\ngone,c,50,y\n')
    _, rows = mc_task(8)
    (root / "eval_data" / "x" / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lm = [{"context": f"Q{i}", "continuation": "zzz"} for i in range(6)]
    (root / "eval_data" / "x" / "lm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lm))
    return root


def test_run_core_reports_missing_tasks_and_a_partial_core(tmp_path, capsys):
    bundle = make_bundle(tmp_path / "bundle")
    tok = FakeTokenizer()
    results, summary = core_eval.run_core(MarkerModel(tok.encode(" zzz")[0]), tok, bundle, "cpu", 64, progress=False)
    assert results["gone"]["missing"] and results["mc"]["accuracy"] == 1.0 and results["lm"]["n"] == 6
    assert summary["partial"] and summary["tasks"] == ["mc", "lm"] and summary["missing"] == ["gone"]
    assert summary["core"] == pytest.approx(1.0) and summary["core_se"] == 0.0
    line = core_eval.core_line(summary, 3)
    assert "PARTIAL" in line and "2 of 3" in line and "gone" in line
    assert "MISSING" in capsys.readouterr().out

    path = tmp_path / "out" / "core.csv"
    core_eval.write_core_csv(path, results, summary)
    accuracies, stated = core_eval.read_results_csv(path)
    assert accuracies == {"mc": 1.0, "lm": 1.0} and stated == 1.0


def test_core_standard_error_propagates():
    results = {"a": dict(centered=0.2, centered_se=0.03), "b": dict(centered=0.4, centered_se=0.04)}
    summary = core_eval.core_summary(results)
    assert summary["core"] == pytest.approx(0.3) and summary["core_se"] == pytest.approx(0.05 / 2)
    assert not summary["partial"]
    task = dict(type="multiple_choice", num_fewshot=0, baseline=0.62)
    r = core_eval.task_result(task, 60, 100)
    assert r["centered_se"] == pytest.approx(math.sqrt(0.6 * 0.4 / 100) / 0.38)


def test_bad_bundle_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="core.yaml"):
        core_eval.load_bundle(tmp_path)


# ---------------------------------------------------------------------------
# Download from a local server


@pytest.fixture
def server(tmp_path):
    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.mark.parametrize("top_folder", [True, False])
def test_bundle_downloads_once_and_unzips_atomically(tmp_path, server, monkeypatch, base_dir, top_folder):
    root, url = server
    bundle = make_bundle(tmp_path / "src" / "eval_bundle")
    with zipfile.ZipFile(root / "eval_bundle.zip", "w") as zf:  # the real zip has an eval_bundle/ folder
        for path in bundle.rglob("*"):
            zf.write(path, path.relative_to(bundle.parent if top_folder else bundle))
    monkeypatch.setenv(core_eval.BUNDLE_URL_ENV, f"{url}/eval_bundle.zip")
    dest = core_eval.ensure_bundle()
    assert dest == base_dir / "eval_bundle" and (dest / "eval_data" / "x" / "mc.jsonl").exists()
    assert [t["label"] for t in core_eval.load_bundle(dest)] == ["mc", "lm", "gone"]
    assert not (base_dir / "eval_bundle.zip").exists()
    monkeypatch.setenv(core_eval.BUNDLE_URL_ENV, f"{url}/nothing-here.zip")
    assert core_eval.ensure_bundle() == dest  # already there: no download


def test_bundle_download_that_is_not_a_zip_is_a_user_error(server, monkeypatch, base_dir):
    root, url = server
    (root / "bad.zip").write_bytes(b"not a zip")
    monkeypatch.setenv(core_eval.BUNDLE_URL_ENV, f"{url}/bad.zip")
    with pytest.raises(UserError, match="not give a zip"):
        core_eval.ensure_bundle()
    assert not (base_dir / "eval_bundle").exists()


# ---------------------------------------------------------------------------
# base_eval helpers


def test_cli_flags():
    args = base_eval.parse_args(["--eval", "core, sample", "--max-per-task", "5", "--source", "mid"])
    assert args.evals == ["core", "sample"] and args.max_per_task == 5 and args.source == "mid"
    with pytest.raises(UserError, match="--eval"):
        base_eval.parse_args(["--eval", "core,mmlu"])
    with pytest.raises(UserError, match="--max-per-task"):
        base_eval.parse_args(["--max-per-task", "0"])


def test_report_section_has_the_summary_numbers(base_dir):
    args = base_eval.parse_args(["--max-per-task", "3"])
    results = {"mc": dict(type="multiple_choice", num_fewshot=0, n=3, accuracy=1.0, accuracy_se=0.0,
                          centered=1.0, centered_se=0.0, baseline=0.25, correct=3),
               "gone": dict(missing=True, type="schema", path="x")}
    summary = core_eval.core_summary(results)
    base_eval.write_report(args, "d4", 10, results, summary, {"train": 1.5, "val": 1.6}, ["hi"], 2, {"gpt2": 0.12})
    data = json.loads((base_dir / "report" / "base-eval.json").read_text())
    assert data["core"] == 1.0 and data["core_se"] == 0.0 and data["bpb"] == {"train": 1.5, "val": 1.6}
    assert data["results"]["mc"]["accuracy"] == 1.0 and data["missing_tasks"] == ["gone"]
    text = (base_dir / "report" / "base-eval.md").read_text()
    assert "PARTIAL" in text and "| gone |" in text and "val bpb: 1.6" in text and "gpt2 CORE, same tasks" in text


@pytest.mark.slow  # builds a real (tiny) GPT: the first model import pays for torch's lazy imports
def test_main_end_to_end_on_a_tiny_model(tmp_path, base_dir, capsys):
    """A random ~30k-parameter GPT through the whole CLI: CORE on a synthetic bundle, bpb, samples."""
    from dataclasses import asdict

    import checkpoint
    from model import GPT, config_from_depth
    from tokenizer import Tokenizer, save_token_bytes

    tok = Tokenizer({bytes([b]): b for b in range(256)})  # bytes only: no BPE training needed
    tok.save(base_dir / "tokenizer")
    save_token_bytes(tok, base_dir / "tokenizer")
    config = config_from_depth(1, tok.get_vocab_size(), sequence_len=64, aspect_ratio=32, head_dim=16)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(40):
        (texts / f"{i}.txt").write_text(f"Document {i}. " + "Some words about nothing in particular. " * 20)
    checkpoint.save_checkpoint("base", "d1", 3, model, None, {"model_config": asdict(config), "source": f"dir:{texts}"})
    bundle = make_bundle(tmp_path / "bundle")

    base_eval.main(["--device", "cpu", "--bundle", str(bundle), "--split-tokens", "256", "--device-batch-size", "2"])
    out = capsys.readouterr().out
    assert "CORE: " in out and "PARTIAL" in out and "val bpb" in out
    accuracies, stated = core_eval.read_results_csv(base_dir / "base_eval" / "core_d1_3.csv")
    assert set(accuracies) == {"mc", "lm"} and stated is not None
    data = json.loads((base_dir / "report" / "base-eval.json").read_text())
    assert data["step"] == 3 and data["tag"] == "d1" and data["missing_tasks"] == ["gone"]
    assert data["results"]["mc"]["n"] == 8 and data["results"]["lm"]["n"] == 6
    assert data["core"] == pytest.approx((data["results"]["mc"]["centered"] + data["results"]["lm"]["centered"]) / 2)
    # bytes-only tokens (1 byte each) and lm_head ~ N(0, 0.001) at init: near-uniform logits over the
    # 265-token vocab, so the loss is ~ln(265) nats per token = log2(265) ~ 8.05 bits per byte
    for split in ("train", "val"):
        assert data["bpb"][split] == pytest.approx(math.log2(tok.get_vocab_size()), rel=0.02), split
    assert len(data["samples"]) == len(base_eval.SAMPLE_PROMPTS)
    assert data["samples"][0].startswith("The capital of France is")
    # without --split-tokens a CPU evaluates 32,768 tokens per split (the d20 amount would take minutes)
    base_eval.main(["--device", "cpu", "--eval", "bpb", "--device-batch-size", "8"])
    assert "(32,768 tokens of dir:" in capsys.readouterr().out


def test_main_without_checkpoint_is_a_user_error(base_dir):
    with pytest.raises(UserError, match="no base checkpoint"):
        base_eval.main(["--device", "cpu", "--eval", "sample"])

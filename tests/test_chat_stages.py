"""mid_train.py, chat_sft.py, chat_eval.py: conversation batching, the masked loss, tiny real runs
on CPU from a tiny base checkpoint (offline preset), and chat_eval's scoring with fake models."""

import json
import math
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import chat_eval
import chat_sft
import checkpoint
import mid_train
from common import UserError

REPO = Path(__file__).resolve().parents[1]
# 2 layers of width 64, 128-token rows, 512 tokens per step
TINY = ["--device", "cpu", "--preset", "offline", "--max-seq-len", "128", "--run", "dummy", "--log-every", "1"]
MID = TINY + ["--device-batch-size", "2", "--total-batch-size", "512", "--eval-tokens", "1024"]
SFT = TINY + ["--device-batch-size", "4", "--examples-per-step", "8", "--eval-examples", "32"]


def task_texts():
    from tasks.arithmetic import Arithmetic
    from tasks.identity import Identity
    from tasks.spelling import SimpleSpelling, SpellingBee

    for task in (Identity(), SimpleSpelling(size=150), SpellingBee(size=150), Arithmetic(size=150)):
        for conversation in task:
            for m in conversation["messages"]:
                c = m["content"]
                yield c if isinstance(c, str) else "".join(p["text"] for p in c)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A 512-token tokenizer trained on ~50 KB of the offline tasks' text and a tiny random GPT
    saved as the base checkpoint "d2", built once for the module."""
    from model import GPT, GPTConfig
    from tokenizer import Tokenizer, save_token_bytes

    root = tmp_path_factory.mktemp("prepared")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPEEDCHAT_BASE_DIR", str(root))
        texts = list(task_texts())
        assert 20_000 < sum(map(len, texts)) < 200_000
        tok = Tokenizer.train_from_iterator(texts, 512)
        tok.save(root / "tokenizer")
        save_token_bytes(tok, root / "tokenizer")
        config = GPTConfig(sequence_len=128, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=4,
                           n_embd=64)
        torch.manual_seed(0)
        model = GPT(config)
        model.init_weights()
        checkpoint.save_checkpoint("base", "d2", 0, model, None, {"model_config": asdict(config)})
    return root


@pytest.fixture
def base_dir(prepared, tmp_path, monkeypatch):
    (tmp_path / "tokenizer").symlink_to(prepared / "tokenizer")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "base").symlink_to(prepared / "checkpoints" / "base")
    monkeypatch.setenv("SPEEDCHAT_BASE_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def tokenizer(base_dir):
    from tokenizer import get_tokenizer

    return get_tokenizer()


# ---------------------------------------------------------------------------
# Pure pieces


def test_help_runs_as_a_module():
    procs = {name: subprocess.Popen([sys.executable, "-m", name, "--help"], cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name in ("mid_train", "chat_sft", "chat_eval")}
    flags = {"mid_train": ["--preset", "--resume", "--total-batch-size", "--num-epochs", "--gsm8k-path"],
             "chat_sft": ["--preset", "--source", "--examples-per-step", "--packing", "--arc-path"],
             "chat_eval": ["--source", "--task-name", "--max-problems", "--num-samples", "--preset"]}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        for flag in flags[name]:
            assert flag in out, (name, flag)
        if name != "chat_eval":  # each default shown once, and only where it says something
            text = " ".join(out.split())
            assert "(default: None)" not in text and "(default: )" not in text, name
            assert "off otherwise) (default" not in text, name
            assert re.search(r"--weight-decay \S+ weight decay \(default: 0\.0\)", text), name


@pytest.mark.parametrize("module, flags, match", [
    (mid_train, ["--num-iterations", "-3"], "--num-iterations must be positive or -1, got -3"),  # not a full epoch
    (mid_train, ["--matrix-lr", "-1"], "--matrix-lr must be >= 0, got -1.0"),
    (mid_train, ["--init-lr-frac", "0"], "--init-lr-frac must be positive, got 0.0"),
    (mid_train, ["--step", "-2"], "--step must be >= 0, or -1 for the latest, got -2"),
    (mid_train, ["--eval-tokens", "0"], "--eval-tokens must be positive, got 0"),
    (chat_sft, ["--num-iterations", "0"], "--num-iterations must be positive or -1, got 0"),
    (chat_sft, ["--warmdown-ratio", "1.5"], "--warmdown-ratio must be between 0 and 1, got 1.5"),
    (chat_sft, ["--eval-examples", "0"], "--eval-examples must be positive, got 0"),
    (chat_sft, ["--log-every", "0"], "--log-every must be positive, got 0"),  # was a ZeroDivisionError mid-run
    (mid_train, ["--device-batch-size", "0"], "--device-batch-size must be positive, got 0"),
])
def test_bad_flags_are_refused(module, flags, match):
    with pytest.raises(UserError, match=re.escape(match)):
        module.get_args(flags)


def test_lr_schedule():
    lrm = mid_train.lr_multiplier
    assert lrm(0.0, 0.2) == lrm(0.5, 0.2) == 1.0 and lrm(0.8, 0.2) == pytest.approx(1.0)
    assert lrm(0.9, 0.2) == pytest.approx(0.5) and lrm(1.0, 0.2) == pytest.approx(0.0)
    assert lrm(0.9, 0.2, final_lr_frac=0.1) == pytest.approx(0.5 + 0.5 * 0.1)
    assert lrm(0.0, 1.0) == 1.0 and lrm(0.25, 1.0) == pytest.approx(0.75)  # SFT: linear decay from the start
    assert lrm(0.99, 0.0) == 1.0


def conversation(user, answer):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


class ListTask:
    """The minimal task protocol: len() and indexing."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_packed_rows_are_full_bos_aligned_and_masked(tokenizer):
    task = ListTask([conversation(f"question {i}?" * (1 + i % 5), f"answer {i}." * (1 + i % 3)) for i in range(40)])
    batches = mid_train.PackedBatches(tokenizer, task, B=3, T=40, buffer_size=8)
    bos = tokenizer.get_bos_token_id()
    for _ in range(4):
        x, y = next(batches)
        assert x.shape == y.shape == (3, 40)
        assert (x[:, 0] == bos).all()  # every row starts a conversation
        assert torch.equal(x[:, 1:], torch.where(y[:, :-1] >= 0, y[:, :-1], x[:, 1:]))  # targets are the next tokens
        assert not (y == bos).any()  # a <|bos|> (mask 0) is never a target
        assert (y >= 0).any() and (y == -1).any()
    # the first row starts with a whole conversation whose targets follow its mask
    fresh = mid_train.PackedBatches(tokenizer, task, B=1, T=400, buffer_size=1)
    x, y = next(fresh)
    ids, mask = tokenizer.render_conversation(task[0], max_tokens=401)
    n = len(ids)
    assert x[0, :n].tolist() == ids
    assert y[0, :n - 1].tolist() == [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
    assert x[0, n].item() == bos  # the next conversation follows at once


def test_packed_state_dict_resumes_the_same_batches(tokenizer):
    task = ListTask([conversation(f"q{i} " * (1 + i % 7), f"a{i} " * (1 + i % 4)) for i in range(50)])
    a = mid_train.PackedBatches(tokenizer, task, B=2, T=32, buffer_size=6)
    for _ in range(3):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # it goes through the checkpoint's JSON/pickle
    expected = [next(a) for _ in range(5)]
    b = mid_train.PackedBatches(tokenizer, task, B=2, T=32, buffer_size=6)
    b.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(expected, (next(b) for _ in range(5))):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert b.taken == a.taken and b.tokens == a.tokens


def test_ranks_read_disjoint_examples(tokenizer):
    task = ListTask([conversation(f"question number {i}", f"reply {i}") for i in range(10)])
    seen = []
    for rank in range(3):
        batches = chat_sft.PaddedBatches(tokenizer, task, B=1, T=64, rank=rank, world_size=3)
        rows = [tokenizer.decode(next(batches)[0][0].tolist()) for _ in range(len(range(rank, 10, 3)))]
        seen += [int(r.split("question number ")[1].split("<")[0]) for r in rows]
    assert sorted(seen) == list(range(10))


def test_padded_rows_pad_with_masked_targets(tokenizer):
    task = ListTask([conversation("hi", "hello there, how are you today?"), conversation("a much longer question " * 3, "ok")])
    x, y = next(chat_sft.PaddedBatches(tokenizer, task, B=2, T=128))
    lengths = [len(tokenizer.render_conversation(c)[0]) for c in task.items]
    assert x.shape == (2, max(lengths) - 1)
    short = lengths.index(min(lengths))
    assert (y[short, min(lengths) - 1:] == -1).all()  # padding is never a target
    ids, mask = tokenizer.render_conversation(task[0])
    assert y[0, :len(ids) - 1].tolist() == [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
    # truncation to T + 1 tokens
    x, y = next(chat_sft.PaddedBatches(tokenizer, task, B=2, T=8))
    assert x.shape == (2, 8)


def test_all_masked_micro_batch_is_finite(prepared):
    """A micro-batch (and a whole step) with no supervised target: finite loss, no NaN anywhere."""
    from model import GPT, GPTConfig

    config = GPTConfig(sequence_len=32, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    optimizers = model.setup_optimizers()
    x = torch.randint(0, 300, (2, 16))
    masked = torch.full((2, 16), -1)
    real = torch.randint(0, 300, (2, 16))
    for micro in ([(x, masked), (x, real)], [(x, masked), (x, masked)]):
        n = sum(int((y >= 0).sum()) for _, y in micro)
        loss_sum = mid_train.forward_backward(model, micro, 1 / max(n, 1))
        assert torch.isfinite(loss_sum)
        for p in model.parameters():
            assert p.grad is None or torch.isfinite(p.grad).all()
        mid_train.step_optimizers(model, optimizers, lrm=1.0)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    # the mean loss the model reports for an all-masked batch is 0, not 0/0
    assert model(x, masked).item() == 0.0


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_full_preset_mixture_from_local_copies(tokenizer, tmp_path):
    if not (SHARED_DATA / "gsm8k" / "train.jsonl").exists():
        pytest.skip(f"the real data is not at {SHARED_DATA}")
    # the real MMLU copy has only dev/ and val/: mid-training must not train on those
    paths = {"smoltalk_path": str(SHARED_DATA / "chat" / "dummy_conversation.json"),
             "gsm8k_path": str(SHARED_DATA / "gsm8k" / "train.jsonl"),
             "mmlu_path": str(SHARED_DATA / "mmlu")}
    with pytest.raises(UserError, match="has no auxiliary_train/ folder"):
        mid_train.mid_tasks("full", "train", paths)
    aux = tmp_path / "mmlu" / "auxiliary_train" / "race.csv"
    aux.parent.mkdir(parents=True)
    aux.write_text("".join(f"Question {i}?,a,b,c,d,{'ABCD'[i % 4]}\n" for i in range(300)))
    paths["mmlu_path"] = str(tmp_path / "mmlu")
    tasks = mid_train.mid_tasks("full", "train", paths)
    names = [t.name for t in tasks]
    assert names[:3] == ["SmolTalk", "MMLU", "GSM8K"] and "SpellingBee" in names
    mix = mid_train.mixture(tasks, "training")
    assert len(mix) == sum(len(t) for t in tasks) > 280_000
    x, y = next(mid_train.PackedBatches(tokenizer, mix, B=2, T=256))
    assert (y >= 0).sum() > 0
    # every dataset came from a local file (its training data): validation falls back to generated tasks
    assert [t.name for t in mid_train.mid_tasks("full", "val", paths)] == ["SimpleSpelling", "SpellingBee", "Arithmetic"]


def test_global_step_loss_is_the_same_nan_on_every_rank(tmp_path):
    """Two gloo processes, a NaN loss on rank 1 only: both get NaN, so both stop at the same step."""
    assert mid_train.global_step_loss(torch.tensor(6.0), 3, ddp=False).item() == 2.0
    init_file = tmp_path / "init"  # a file rendezvous: no port to pick that another process could take
    script = (f"import sys, torch, torch.distributed as dist, mid_train\n"
              f"rank = int(sys.argv[1])\n"
              f"dist.init_process_group('gloo', init_method='file://{init_file}', rank=rank, world_size=2)\n"
              f"loss = torch.tensor(float('nan') if rank == 1 else 3.0)\n"
              f"print(mid_train.global_step_loss(loss, 4, ddp=True).item())\n"
              f"dist.destroy_process_group()\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(rank)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
        assert out.split()[-1] == "nan"


# ---------------------------------------------------------------------------
# Tiny real runs (offline preset)


@pytest.mark.slow
def test_mid_train_lowers_loss_and_writes_report(base_dir):
    result = mid_train.main(MID + ["--num-iterations", "24", "--eval-every", "12", "--save-every", "-1"])
    curve = result["curve"]
    assert curve["val_step"] == [0, 12, 24]
    assert curve["val_bpb"][-1] < curve["val_bpb"][0] - 0.5, curve["val_bpb"]
    assert curve["loss"][-1] < curve["loss"][0] - 1.0, curve["loss"]
    model, tokenizer, meta = checkpoint.load_model("mid", "cpu")
    assert meta["step"] == 24 and meta["tag"] == "d2" and meta["source_checkpoint"]["stage"] == "base"
    assert meta["model_config"]["n_embd"] == 64
    data = json.loads((base_dir / "report" / "mid-train.json").read_text())
    assert data["curve"]["val_bpb"] == curve["val_bpb"] and len(data["curve"]["loss"]) == 24
    assert data["seconds"] > 0
    assert "Mid-training" in (base_dir / "report" / "mid-train.md").read_text()


@pytest.mark.slow
def test_mid_train_resume_is_bitwise_identical(base_dir):
    flags = MID + ["--num-iterations", "6", "--save-every", "3", "--eval-every", "3", "--keep-last", "-1",
                   "--device-batch-size", "1"]  # 512 tokens/step = 1 x 128 x 4 accumulation
    mid_train.main(flags)
    straight_model, _, straight_meta = checkpoint.load_checkpoint("mid", "d2", 6, "cpu")
    mid_train.main(flags + ["--resume", "--resume-step", "3"])
    resumed_model, _, resumed_meta = checkpoint.load_checkpoint("mid", "d2", 6, "cpu")
    for k in straight_model:
        assert torch.equal(straight_model[k], resumed_model[k]), k
    assert straight_meta["loss"] == resumed_meta["loss"] and straight_meta["val_bpb"] == resumed_meta["val_bpb"]
    first, _, _ = checkpoint.load_checkpoint("mid", "d2", 3, "cpu")
    assert not torch.equal(first["blocks.0.attn.c_q.weight"], straight_model["blocks.0.attn.c_q.weight"])


def test_mid_train_errors_are_one_line(base_dir):
    with pytest.raises(UserError, match="--resume: no mid checkpoint"):
        mid_train.main(MID + ["--num-iterations", "1", "--resume"])
    with pytest.raises(UserError, match="no base checkpoint"):
        mid_train.main(MID + ["--num-iterations", "1", "--model-tag", "nope"])
    with pytest.raises(UserError, match="not a multiple"):
        mid_train.main(MID + ["--num-iterations", "1", "--total-batch-size", "300"])


def test_non_finite_loss_stops_with_one_line(base_dir, monkeypatch):
    forward_backward = mid_train.forward_backward
    monkeypatch.setattr(mid_train, "forward_backward", lambda *a: forward_backward(*a) * float("nan"))
    with pytest.raises(UserError, match="the loss became nan at step 1"):
        mid_train.main(MID + ["--num-iterations", "3", "--eval-every", "-1"])


def retrain_base(base_dir, step, loss):
    """Stand-in for a new base run: a checkpoint d2/`step` of a fresh model with its own meta."""
    from model import GPT, GPTConfig

    base = base_dir / "checkpoints" / "base"
    config = json.loads(next(base.glob("d2/meta_*.json")).read_text())["model_config"]
    if base.is_symlink():  # the module's shared base checkpoint: leave it alone, write a new one here
        base.unlink()
    model = GPT(GPTConfig(**config))
    model.init_weights()
    checkpoint.save_checkpoint("base", "d2", step, model, None, {"model_config": config, "loss": loss})


def test_resume_refuses_a_retrained_source(base_dir):
    flags = MID + ["--num-iterations", "2", "--eval-every", "-1", "--save-every", "1", "--keep-last", "-1"]
    mid_train.main(flags)
    _, _, meta = checkpoint.load_checkpoint("mid", "d2", 2, "cpu")
    assert meta["source_checkpoint"]["stage"] == "base" and meta["source_checkpoint"]["step"] == 0
    assert len(meta["source_checkpoint"]["fingerprint"]) == 16
    # the same base: resuming is fine
    assert mid_train.main(flags + ["--resume", "--resume-step", "1"])["step"] == 2
    with pytest.raises(UserError, match="was trained from base d2 step 0: resume with --source base"):
        mid_train.main(flags + ["--resume", "--source", "mid"])
    # base retrained, same tag and step: refused
    retrain_base(base_dir, 0, loss=3.25)
    with pytest.raises(UserError, match=r"the mid checkpoint in .*mid/d2 was trained from base d2 step 0, but the "
                                        r"latest base checkpoint is a different d2 step 0 \(retrained since\): "
                                        r"drop --resume to start over"):
        mid_train.main(flags + ["--resume"])
    # base retrained to a later step: refused, naming it; a fresh start is fine
    retrain_base(base_dir, 5, loss=3.0)
    with pytest.raises(UserError, match="latest base checkpoint is d2 step 5: drop --resume"):
        mid_train.main(flags + ["--resume"])
    assert mid_train.main(flags)["step"] == 2
    _, _, meta = checkpoint.load_checkpoint("mid", "d2", 2, "cpu")
    assert meta["source_checkpoint"]["step"] == 5


@pytest.mark.slow
def test_chat_sft_lowers_loss_and_stops_after_its_epochs(base_dir):
    # 942 offline conversations x 0.1 epochs = 94.2 -> 12 steps of 8
    result = chat_sft.main(SFT + ["--source", "base", "--num-epochs", "0.1", "--init-lr-frac", "0.5",
                                  "--eval-every", "6"])
    assert result["step"] == 12
    curve = result["curve"]
    assert curve["val_bpb"][-1] < curve["val_bpb"][0] - 0.3, curve["val_bpb"]
    assert curve["loss"][-1] < curve["loss"][0] - 0.5, curve["loss"]
    _, _, meta = checkpoint.load_model("sft", "cpu")
    assert meta["step"] == 12 and meta["source_checkpoint"]["stage"] == "base"
    data = json.loads((base_dir / "report" / "chat-sft.json").read_text())
    assert data["curve"]["loss"] == curve["loss"] and data["seconds"] > 0


# ---------------------------------------------------------------------------
# chat_eval


class MCTask:
    """Multiple-choice questions with known answers (the shape tasks.common.mc_conversation makes)."""

    eval_type = "categorical"
    name = "FakeMC"

    def __init__(self, n):
        from tasks.common import mc_conversation

        self.items = [mc_conversation("Which one? " + "really " * (i % 4), ["red", "green", "blue", "cyan"], i % 4)
                      for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def evaluate(self, conversation, completion):
        return completion == conversation["messages"][-1]["content"]


class LetterModel(torch.nn.Module):
    """Logits that put a non-letter token first everywhere and, at the end of each known prompt,
    a chosen letter second: only restricting to the letters finds it."""

    def __init__(self, tokenizer, task, pick):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.vocab = tokenizer.get_vocab_size()
        self.answers = {}
        for c in task.items:
            letter = pick(c)
            self.answers[tuple(tokenizer.render_for_completion(c))] = tokenizer.encode(letter)[0]

    def forward(self, idx, positions=None):
        if positions is not None:  # the answer position of each row, as chat_eval asks for it
            return self.forward(idx)[torch.arange(idx.size(0)), positions]
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab)
        logits[:, :, 0] = 100.0
        for b in range(B):
            row = idx[b].tolist()
            for t in range(T):
                answer = self.answers.get(tuple(row[:t + 1]))
                if answer is not None:
                    logits[b, t, answer] = 50.0
        return logits


def test_categorical_scores_right_and_wrong_letters(tokenizer):
    task = MCTask(10)
    right = lambda c: c["messages"][-1]["content"]
    wrong = lambda c: "ABCD"[("ABCD".index(right(c)) + 1) % 4]
    for pick, expected in ((right, 10), (wrong, 0)):
        model = LetterModel(tokenizer, task, pick)
        correct, total = chat_eval.evaluate_task(task, model, tokenizer, None, batch_size=4)  # padded batches
        assert (correct, total) == (expected, 10)
    # ranks split the problems: rank 1 of 3 gets 1, 4, 7
    correct, total = chat_eval.evaluate_task(task, LetterModel(tokenizer, task, right), tokenizer, None,
                                             rank=1, world_size=3)
    assert (correct, total) == (3, 3)
    assert chat_eval.evaluate_task(task, LetterModel(tokenizer, task, right), tokenizer, None, max_problems=4) == (4, 4)


class ScriptedEngine:
    """generate_batch that answers each prompt from a script: samples[i] is the i-th sample's text."""

    def __init__(self, tokenizer, task, samples):
        self.tokenizer = tokenizer
        self.replies = {tuple(tokenizer.render_for_completion(c)): samples(c) for c in task}

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        texts = self.replies[tuple(tokens)][:num_samples]
        return [list(tokens) + self.tokenizer.encode(t) for t in texts], None


def test_generative_scoring_and_pass_at_k(tokenizer):
    from tasks.arithmetic import Arithmetic

    task = Arithmetic(size=6, split="test")
    engine = ScriptedEngine(tokenizer, task, lambda c: ["I think 7.", "no idea", f"The answer is {c['answer']}."])
    model = torch.nn.Linear(1, 1)  # only its device is used on the generative path
    assert chat_eval.evaluate_task(task, model, tokenizer, engine, num_samples=1) == (0, 6)
    assert chat_eval.evaluate_task(task, model, tokenizer, engine, num_samples=3) == (6, 6)  # pass@3
    right = ScriptedEngine(tokenizer, task, lambda c: [f"{c['answer']}"])
    assert chat_eval.evaluate_task(task, model, tokenizer, right) == (6, 6)


def test_summary_scores_and_chatcore():
    results, chatcore, se = chat_eval.summarize({"ARC-Easy": (50, 100), "GSM8K": (10, 100), "MMLU": (25, 100)})
    assert results["ARC-Easy"]["acc"] == 0.5 and results["ARC-Easy"]["se"] == pytest.approx(0.05)
    assert results["MMLU"]["centered"] == pytest.approx(0.0)
    assert chatcore == pytest.approx(((0.5 - 0.25) / 0.75 + 0.1 + 0.0) / 3)
    expected_se = math.sqrt((0.05 / 0.75) ** 2 + (math.sqrt(0.09 / 100)) ** 2 + (math.sqrt(0.25 * 0.75 / 100) / 0.75) ** 2) / 3
    assert se == pytest.approx(expected_se)
    assert chat_eval.summarize({"GSM8K": (0, 0)}) == ({}, None, None)


def test_tasks_without_data_are_skipped_with_a_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDCHAT_BASE_DIR", str(tmp_path))
    task, reason = chat_eval.load_task("GSM8K", {}, "offline")
    assert task is None and "--gsm8k-path" in reason
    task, reason = chat_eval.load_task("HumanEval", {"humaneval_path": str(tmp_path / "missing.jsonl")}, "full")
    assert task is None and "does not exist" in reason
    task, reason = chat_eval.load_task("SpellingBee", {}, "offline")
    assert reason is None and task.eval_type == "generative"
    assert chat_eval.task_names("", "offline") == chat_eval.TASK_NAMES
    assert chat_eval.task_names("gsm8k, arc-easy", "full") == ["GSM8K", "ARC-Easy"]
    with pytest.raises(UserError, match="unknown --task-name"):
        chat_eval.task_names("GSM9K", "full")


def test_arc_path_finds_subset_files(tmp_path):
    for name in ("ARC-Easy-Train.jsonl", "ARC-Easy-Test.jsonl", "ARC-Challenge-Test.jsonl"):
        (tmp_path / "ARC-V1" / name.split("-Train")[0].split("-Test")[0]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "ARC-V1" / name.split("-Train")[0].split("-Test")[0] / name).write_text("")
    assert mid_train.arc_path(tmp_path, "ARC-Easy", "test").name == "ARC-Easy-Test.jsonl"
    assert mid_train.arc_path(tmp_path, "ARC-Challenge", "test").name == "ARC-Challenge-Test.jsonl"
    with pytest.raises(UserError, match="no ARC-Challenge-Train.jsonl"):
        mid_train.arc_path(tmp_path, "ARC-Challenge", "train")
    assert mid_train.arc_path(None, "ARC-Easy", "test") is None


@pytest.mark.slow
def test_chat_eval_end_to_end_offline(base_dir):
    mid_train.main(MID + ["--num-iterations", "2", "--eval-every", "-1"])
    out = chat_eval.main(["--device", "cpu", "--source", "mid", "--preset", "offline", "--max-problems", "3",
                          "--max-new-tokens", "8"])
    assert set(out["results"]) == {"SpellingBee", "Arithmetic"}
    assert set(out["skipped"]) == {"ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval"}
    data = json.loads((base_dir / "report" / "chat-eval-mid.json").read_text())
    assert data["results"]["SpellingBee"]["acc"] == out["results"]["SpellingBee"]["acc"]
    assert data["chatcore"] == out["chatcore"] and "chatcore_se" in data
    with pytest.raises(UserError, match="no sft checkpoint"):
        chat_eval.main(["--device", "cpu", "--source", "sft", "--max-problems", "1"])
    # nothing evaluated (every task needs a download here) is an error, and the section stays
    with pytest.raises(UserError, match=r"^no task could be evaluated \(1 skipped, reasons above\)"):
        chat_eval.main(["--device", "cpu", "--source", "mid", "--preset", "offline", "--task-name", "MMLU"])
    assert json.loads((base_dir / "report" / "chat-eval-mid.json").read_text()) == data
    with pytest.raises(UserError, match="--max-problems must be at least 1"):
        chat_eval.main(["--device", "cpu", "--source", "mid", "--max-problems", "0"])

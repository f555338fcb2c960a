"""mid_train.py, chat_sft.py, chat_eval.py: padded rows, the masked loss (2 ranks = 1 rank), exact
resume, the source check, tiny real runs from the session's base model (offline preset), and
chat_eval's scoring with fake models."""

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import chat_eval
import chat_sft
import checkpoint
import mid_train
import training
from common import UserError
from conftest import CHAT, link_base_dir

MID = CHAT + ["--device-batch-size", "1", "--total-batch-size", "512", "--eval-tokens", "1024"]  # 4 x 128 per step
SFT = CHAT + ["--device-batch-size", "4", "--examples-per-step", "8", "--eval-examples", "32"]


def conversation(user, answer):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


@pytest.fixture
def tokenizer(base_dir):
    from tokenizer import get_tokenizer

    return get_tokenizer()


def test_padded_rows_mask_padding_and_split_ranks(tokenizer):
    task = [conversation("hi", "hello there, how are you today?"), conversation("a much longer question " * 3, "ok")]
    x, y = next(chat_sft.PaddedBatches(tokenizer, task, B=2, T=128))
    lengths = [len(tokenizer.render_conversation(c)[0]) for c in task]
    assert x.shape == y.shape == (2, max(lengths) - 1)
    short = lengths.index(min(lengths))
    assert (y[short, min(lengths) - 1:] == -1).all()  # padding is never a target
    ids, mask = tokenizer.render_conversation(task[0])
    assert y[0, :len(ids) - 1].tolist() == [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
    assert next(chat_sft.PaddedBatches(tokenizer, task, B=2, T=8))[0].shape == (2, 8)  # cut to T + 1 tokens
    task = [conversation(f"question number {i}", f"reply {i}") for i in range(10)]
    seen = []
    for rank in range(3):
        batches = chat_sft.PaddedBatches(tokenizer, task, B=1, T=64, rank=rank, world_size=3)
        rows = [tokenizer.decode(next(batches)[0][0].tolist()) for _ in range(len(range(rank, 10, 3)))]
        seen += [int(r.split("question number ")[1].split("<")[0]) for r in rows]
    assert sorted(seen) == list(range(10))  # disjoint, and together every example


def tiny_model():
    from test_model import make_model, tiny_config

    return make_model(tiny_config(sequence_len=32, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))


def micro_batches():
    """Four micro-batches of 2 x 16 with different numbers of supervised targets, one with none."""
    g = torch.Generator().manual_seed(1)
    out = []
    for keep in (0.9, 0.2, 0.0, 0.6):
        x, y = torch.randint(0, 300, (2, 16), generator=g), torch.randint(0, 300, (2, 16), generator=g)
        out.append((x, torch.where(torch.rand(2, 16, generator=g) < keep, y, -1)))
    return out


def masked_grads(micro, world_size=1):
    """(loss, gradients) of training.masked_step over `micro` on this rank; gradients averaged over
    ranks as the optimizers do."""
    model = tiny_model()
    run = SimpleNamespace(model=model, device=torch.device("cpu"), world_size=world_size, autocast=torch.enable_grad())
    loss, _ = training.masked_step(run, iter(micro), len(micro))()
    grads = []
    for p in model.parameters():
        if world_size > 1:
            torch.distributed.all_reduce(p.grad)
        grads.append(p.grad / world_size)
    return training.global_mean(loss), grads


def _two_rank_worker(rank, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    loss, grads = masked_grads(micro_batches()[2 * rank:2 * rank + 2], world_size=2)  # rank 1 has the empty one
    nan = training.global_mean(torch.tensor(math.nan if rank == 1 else 3.0)).item()
    torch.save({"loss": loss, "grads": grads, "nan": nan}, Path(out_dir) / f"{rank}.pt")
    torch.distributed.destroy_process_group()
    os._exit(0)  # a forked child skips interpreter teardown (where stray torch threads can abort it)


def test_masked_loss_is_the_mean_over_supervised_tokens_on_every_rank(tmp_path):
    micro = micro_batches()
    loss, grads = masked_grads(micro)
    model = tiny_model()  # reference: the mean loss over all supervised tokens, in one batch
    x, y = torch.cat([x for x, _ in micro]), torch.cat([y for _, y in micro])
    expected = model(x, y, loss_reduction="sum") / (y >= 0).sum()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)
    # 2 ranks with half the micro-batches each = 1 rank with all of them
    torch.multiprocessing.start_processes(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                                          start_method="fork")  # (no re-import: seconds faster than spawn)
    for rank in range(2):
        out = torch.load(tmp_path / f"{rank}.pt")
        assert out["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(out["grads"], grads))
        assert math.isnan(out["nan"])  # a NaN on one rank is seen on every rank: all stop together
    # a step with nothing to learn trains nothing and stays finite (not 0/0)
    loss, grads = masked_grads([micro[2], micro[2]])
    assert loss.item() == 0.0 and all(torch.isfinite(g).all() for g in grads)


def resume_is_exact(stage, main, flags):
    """Run `flags` straight, then again resumed from its first checkpoint: the same final model."""
    main(flags)
    steps = checkpoint.list_steps(checkpoint.checkpoint_dir(stage, "d2"))
    straight, _, meta = checkpoint.load_checkpoint(stage, "d2", steps[-1], "cpu")
    main(flags + ["--resume", "--resume-step", str(steps[0])])
    resumed, _, resumed_meta = checkpoint.load_checkpoint(stage, "d2", steps[-1], "cpu")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert meta["loss"] == resumed_meta["loss"] and meta["val_bpb"] == resumed_meta["val_bpb"]
    first, _, _ = checkpoint.load_checkpoint(stage, "d2", steps[0], "cpu")
    assert not torch.equal(first["blocks.0.attn.c_q.weight"], straight["blocks.0.attn.c_q.weight"])


@pytest.mark.slow
def test_mid_train_resume_is_bitwise_identical(chat_dir):
    resume_is_exact("mid", mid_train.main, MID + ["--num-iterations", "6", "--save-every", "3", "--keep-last", "-1"])


@pytest.mark.slow
def test_chat_sft_resume_by_epochs_is_bitwise_identical(chat_dir):
    # 942 offline conversations x 0.05 epochs = 47.1 -> 6 steps of 8
    resume_is_exact("sft", chat_sft.main, SFT + ["--source", "base", "--num-epochs", "0.05", "--save-every", "3",
                                                 "--keep-last", "-1", "--eval-every", "3"])
    assert checkpoint.list_steps(checkpoint.checkpoint_dir("sft", "d2")) == [3, 6]


def test_the_session_runs_learned_and_reported(trained):
    for section, steps in (("mid-train", 12), ("chat-sft", 6)):
        data = json.loads((trained / "report" / f"{section}.json").read_text())
        assert data["steps"] == steps and data["curve"]["loss"][-1] < data["curve"]["loss"][0], section
        assert data["started_from"].startswith("base d2 step 20" if section == "mid-train" else "mid d2 step 12")
    curve = json.loads((trained / "report" / "mid-train.json").read_text())["curve"]
    assert curve["val_step"] == [0, 6, 12] and curve["val_bpb"][-1] < curve["val_bpb"][0] - 0.5, curve["val_bpb"]
    meta = json.loads((trained / "checkpoints" / "sft" / "d2" / "meta_000006.json").read_text())
    assert meta["source_checkpoint"]["stage"] == "mid" and meta["preset"] == "offline"


def test_errors_users_hit(chat_dir):
    with pytest.raises(UserError, match="--resume: no mid checkpoint"):
        mid_train.main(MID + ["--num-iterations", "1", "--resume"])
    with pytest.raises(UserError, match="no base checkpoint"):
        mid_train.main(MID + ["--num-iterations", "1", "--model-tag", "nope"])
    with pytest.raises(UserError, match="no mid checkpoint"):
        chat_sft.main(SFT + ["--num-iterations", "1"])
    with pytest.raises(UserError, match="not a multiple"):
        mid_train.main(MID + ["--num-iterations", "1", "--total-batch-size", "300"])
    with pytest.raises(UserError, match="--examples-per-step 6 is not a multiple"):
        chat_sft.main(SFT + ["--source", "base", "--num-iterations", "1", "--examples-per-step", "6"])


def test_resume_refuses_a_retrained_source(chat_dir):
    flags = MID + ["--num-iterations", "2", "--save-every", "1", "--keep-last", "-1"]
    mid_train.main(flags)
    assert mid_train.main(flags + ["--resume", "--resume-step", "1"])["step"] == 2  # the same base: fine
    with pytest.raises(UserError, match="trained with source_checkpoint"):
        mid_train.main(flags + ["--resume", "--source", "mid"])
    # base retrained (same tag and step, another meta): refused; a fresh start is fine
    base = chat_dir / "checkpoints" / "base"
    model, _, meta = checkpoint.load_model("base", "cpu")
    base.unlink()  # (the session's base checkpoint: write a new one here instead)
    checkpoint.save_checkpoint("base", "d2", 20, model, None, {"model_config": meta["model_config"], "loss": 1.0})
    with pytest.raises(UserError, match="drop --resume to start over"):
        mid_train.main(flags + ["--resume"])
    assert mid_train.main(flags)["step"] == 2


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_full_preset_mixture_from_local_copies(tmp_path):
    if not (SHARED_DATA / "gsm8k" / "train.jsonl").exists():
        pytest.skip(f"the real data is not at {SHARED_DATA}")
    aux = tmp_path / "mmlu" / "auxiliary_train" / "race.csv"
    aux.parent.mkdir(parents=True)
    aux.write_text("".join(f"Question {i}?,a,b,c,d,{'ABCD'[i % 4]}\n" for i in range(300)))
    paths = dict.fromkeys(["arc_path", "humaneval_path", "words_path", "identity_path"]) | {"chat_data": [],
        "smoltalk_path": str(SHARED_DATA / "chat" / "dummy_conversation.json"),
        "gsm8k_path": str(SHARED_DATA / "gsm8k" / "train.jsonl"), "mmlu_path": str(tmp_path / "mmlu")}
    names = [t.name for t in mid_train.mid_tasks("full", "train", paths)]
    assert names[:3] == ["SmolTalk", "MMLU", "GSM8K"] and "SpellingBee" in names
    # every dataset came from a local file (its training data): validation falls back to generated tasks
    assert [t.name for t in mid_train.mid_tasks("full", "val", paths)] == ["SimpleSpelling", "SpellingBee", "Arithmetic"]


# ---------------------------------------------------------------------------
# chat_eval


class MCTask(list):
    """Multiple-choice questions with known answers (the shape tasks.common.mc_conversation makes)."""

    eval_type, name = "categorical", "FakeMC"

    def evaluate(self, conversation, completion):
        return completion == conversation["messages"][-1]["content"]


class LetterModel(torch.nn.Module):
    """Logits that put a non-letter token first everywhere and, at the end of each known prompt,
    a chosen letter second: only restricting to the letters finds it."""

    def __init__(self, tokenizer, task, pick):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.vocab = tokenizer.get_vocab_size()
        self.answers = {tuple(tokenizer.render_for_completion(c)): tokenizer.encode(pick(c))[0] for c in task}

    def forward(self, idx, positions=None):
        if positions is not None:  # the answer position of each row, as chat_eval asks for it
            return self.forward(idx)[torch.arange(idx.size(0)), positions]
        logits = torch.zeros(*idx.shape, self.vocab)
        logits[:, :, 0] = 100.0
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                if (answer := self.answers.get(tuple(row[:t + 1]))) is not None:
                    logits[b, t, answer] = 50.0
        return logits


def test_categorical_scores_right_and_wrong_letters(tokenizer):
    from tasks.common import mc_conversation

    task = MCTask(mc_conversation("Which one? " + "really " * (i % 4), ["red", "green", "blue", "cyan"], i % 4)
                  for i in range(10))
    right = lambda c: c["messages"][-1]["content"]  # noqa: E731
    wrong = lambda c: "ABCD"[("ABCD".index(right(c)) + 1) % 4]  # noqa: E731
    for pick, expected in ((right, 10), (wrong, 0)):
        assert chat_eval.evaluate_task(task, LetterModel(tokenizer, task, pick), tokenizer, None, batch_size=4) \
            == (expected, 10)
    # ranks split the problems: rank 1 of 3 gets 1, 4, 7
    model = LetterModel(tokenizer, task, right)
    assert chat_eval.evaluate_task(task, model, tokenizer, None, rank=1, world_size=3) == (3, 3)
    assert chat_eval.evaluate_task(task, model, tokenizer, None, max_problems=4) == (4, 4)


class ScriptedEngine:
    """generate_batch that answers each prompt from a script: samples[i] is the i-th sample's text."""

    def __init__(self, tokenizer, task, samples):
        self.tokenizer = tokenizer
        self.replies = {tuple(tokenizer.render_for_completion(c)): samples(c) for c in task}

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        return [list(tokens) + self.tokenizer.encode(t) for t in self.replies[tuple(tokens)][:num_samples]], None


def test_generative_scoring_pass_at_k_and_chatcore(tokenizer):
    from tasks.arithmetic import Arithmetic

    task = Arithmetic(size=6, split="test")
    engine = ScriptedEngine(tokenizer, task, lambda c: ["I think 7.", "no idea", f"The answer is {c['answer']}."])
    model = torch.nn.Linear(1, 1)  # only its device is used on the generative path
    assert chat_eval.evaluate_task(task, model, tokenizer, engine, num_samples=1) == (0, 6)
    assert chat_eval.evaluate_task(task, model, tokenizer, engine, num_samples=3) == (6, 6)  # pass@3
    results, chatcore, se = chat_eval.summarize({"ARC-Easy": (50, 100), "GSM8K": (10, 100), "MMLU": (25, 100)})
    assert results["ARC-Easy"]["acc"] == 0.5 and results["ARC-Easy"]["se"] == pytest.approx(0.05)
    assert results["MMLU"]["centered"] == pytest.approx(0.0)
    assert chatcore == pytest.approx(((0.5 - 0.25) / 0.75 + 0.1 + 0.0) / 3)
    assert se == pytest.approx(math.sqrt((0.05 / 0.75) ** 2 + 0.09 / 100 + (0.25 * 0.75 / 100) / 0.75 ** 2) / 3)
    assert chat_eval.summarize({"GSM8K": (0, 0)}) == ({}, None, None)


def test_tasks_without_data_are_skipped_with_a_reason(tmp_path):
    from tasks.mixtures import arc_path

    task, reason = chat_eval.load_task("GSM8K", {}, "offline")
    assert task is None and "--gsm8k-path" in reason
    task, reason = chat_eval.load_task("HumanEval", {"humaneval_path": str(tmp_path / "missing.jsonl")}, "full")
    assert task is None and reason
    assert chat_eval.task_names("gsm8k, arc-easy", "full") == ["GSM8K", "ARC-Easy"]
    for name in ("ARC-Easy/ARC-Easy-Train.jsonl", "ARC-Easy/ARC-Easy-Test.jsonl", "ARC-Challenge/ARC-Challenge-Test.jsonl"):
        (tmp_path / "ARC-V1" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "ARC-V1" / name).write_text("")
    assert arc_path(tmp_path, "ARC-Challenge", "test").name == "ARC-Challenge-Test.jsonl"
    with pytest.raises(UserError, match="no ARC-Challenge-Train.jsonl"):
        arc_path(tmp_path, "ARC-Challenge", "train")


@pytest.mark.slow
def test_chat_eval_end_to_end_offline(trained, tmp_path, monkeypatch):
    base_dir = link_base_dir(trained, tmp_path, monkeypatch, checkpoints=["base", "mid"])
    out = chat_eval.main(["--device", "cpu", "--source", "mid", "--preset", "offline", "--max-problems", "3",
                          "--max-new-tokens", "8"])
    assert set(out["results"]) == {"SpellingBee", "Arithmetic"}
    assert set(out["skipped"]) == {"ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval"}
    data = json.loads((base_dir / "report" / "chat-eval-mid.json").read_text())
    assert data["results"]["SpellingBee"]["acc"] == out["results"]["SpellingBee"]["acc"]
    assert data["chatcore"] == out["chatcore"] and data["max_problems"] == 3
    # nothing evaluated (every task needs a download here) is an error, and the section stays
    with pytest.raises(UserError, match=r"^no task could be evaluated"):
        chat_eval.main(["--device", "cpu", "--source", "mid", "--preset", "offline", "--task-name", "MMLU"])
    assert json.loads((base_dir / "report" / "chat-eval-mid.json").read_text()) == data
    with pytest.raises(UserError, match="no sft checkpoint"):
        chat_eval.main(["--device", "cpu", "--source", "sft", "--max-problems", "1"])

"""chat_rl.py: the advantages and the policy-gradient loss on a hand-made group (forced calculator
tokens and the prompt untrained), one step on 2 ranks = on 1 rank, and exact resume of a real run."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import chat_rl
from common import global_mean
from conftest import CHAT, link_base_dir
from engine import Engine
from test_chat_stages import resume_is_exact


def tiny_model(vocab_size=300):
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    with torch.no_grad():  # no zero-initialised weights: every parameter gets a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_advantages_and_loss_on_a_hand_made_group():
    assert chat_rl.group_advantages([1, 0, 0, 1]) == [0.5, -0.5, -0.5, 0.5]
    assert chat_rl.group_advantages([1, 1, 1]) == [0, 0, 0]  # all alike: nothing to learn
    streams = {tuple(torch.rand(2, generator=torch.Generator().manual_seed(chat_rl.sample_seed(seed, draw))).tolist())
               for seed in (1, 2) for draw in (0, 1)}
    assert len(streams) == 4  # another --seed or another problem: other samples
    prompt = [1, 2, 3]
    group = [([10, 11, 12, 13, 14], [1, 0, 0, 1, 1], 0.75),  # 11 and 12 forced by the calculator
             ([20, 21], [1, 1], -0.25), ([30, 31, 32], [1, 1, 1], -0.25), ([40], [1], -0.25)]
    x, y, advantages = chat_rl.pad_rows([(prompt, t, s, a) for t, s, a in group], pad=0)
    assert x.shape == y.shape == (4, 7) and advantages.tolist() == [0.75, -0.25, -0.25, -0.25]
    assert x[0].tolist() == [1, 2, 3, 10, 11, 12, 13] and y[3].tolist() == [-1, -1, 40, -1, -1, -1, -1]
    assert y[0].tolist() == [-1, -1, 10, -1, -1, 13, 14]  # the prompt and forced tokens are no targets
    assert y[1].tolist() == [-1, -1, 20, 21, -1, -1, -1]  # nor is padding
    model = tiny_model()
    loss = chat_rl.policy_loss(model, x, y, advantages)
    logp = torch.log_softmax(model(x), dim=-1)
    expected = -sum(logp[r, t - 1, tokens[t - 3]] * a for r, (tokens, sampled, a) in enumerate(group)
                    for t in range(3, 3 + len(tokens)) if sampled[t - 3])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_rollout_keeps_the_stop_token_and_the_forced_mask():
    columns = [([5, 6], [1, 0]), ([9, 7], [1, 1]), ([8, 9], [1, 1])]  # 9 stops a row; 8 comes after a stop
    engine = SimpleNamespace(stop_tokens={9}, generate=lambda *args, **kwargs: iter(columns))
    engine.generate_batch = lambda *args, **kwargs: Engine.generate_batch(engine, *args, **kwargs)  # the real one
    assert chat_rl.rollout(engine, [1], 2, 3, seed=0) == [([5, 9], [1, 1]), ([6, 7, 9], [0, 1, 1])]


def one_step(tokenizer, rank, world_size, check_loss=False):
    """(loss, gradients averaged over ranks) of one RL step on 4 arithmetic problems, rewarded by
    the parity of the answer's length (a reward a tiny model earns half the time)."""
    from tasks.arithmetic import Arithmetic

    model = tiny_model(tokenizer.get_vocab_size())
    run = SimpleNamespace(orig_model=model, model=model, tokenizer=tokenizer, rank=rank, world_size=world_size,
                          device=torch.device("cpu"), autocast=torch.enable_grad(), curve={}, step=0)
    args = SimpleNamespace(examples_per_step=4, num_samples=3, max_new_tokens=6, seed=7, device_batch_size=2,
                           log_every=1)
    grader = SimpleNamespace(evaluate=lambda conversation, text: len(text) % 2 == 0)
    problems = chat_rl.Problems(Arithmetic(size=4), rank, world_size)
    loss, trained = chat_rl.rl_step(run, args, Engine(model, tokenizer), problems, grader, max_len=64)()
    if check_loss:  # the same answers again: -log p x (reward - its group's mean), averaged over sampled tokens
        rows = []
        for draw, conversation in chat_rl.Problems(Arithmetic(size=4), 0, 1).take(4):
            prompt, answers, rewards = chat_rl.sample_and_score(run, args, Engine(model, tokenizer), grader,
                                                                conversation, 3, 64, chat_rl.sample_seed(7, draw))
            rows += [(prompt, *answer, r - sum(rewards) / 3) for answer, r in zip(answers, rewards)]
        assert trained == sum(sum(sampled) for _, _, sampled, _ in rows)
        expected = sum(chat_rl.policy_loss(model, *chat_rl.pad_rows([row], 0)) for row in rows) / trained
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    for g in grads:
        if world_size > 1:
            torch.distributed.all_reduce(g)
        g /= world_size
    return global_mean(loss), grads, run.curve["reward"]


def _two_rank_worker(rank, init_file, out_dir):
    from tokenizer import get_tokenizer

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.save(one_step(get_tokenizer(), rank, 2), Path(out_dir) / f"{rank}.pt")
    torch.distributed.destroy_process_group()
    os._exit(0)  # a forked child skips interpreter teardown


def test_a_step_on_two_ranks_equals_one_rank(base_dir, tmp_path):
    from tokenizer import get_tokenizer

    loss, grads, reward = one_step(get_tokenizer(), 0, 1, check_loss=True)
    assert 0 < reward[0] < 1 and all(g.abs().sum() > 0 for g in grads)
    torch.multiprocessing.start_processes(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                                          start_method="fork")
    for rank in range(2):
        rank_loss, rank_grads, rank_reward = torch.load(tmp_path / f"{rank}.pt")
        assert rank_reward == reward and rank_loss.item() == pytest.approx(loss.item(), abs=1e-6)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-8) for a, b in zip(rank_grads, grads, strict=True))


@pytest.mark.slow
def test_chat_rl_resume_is_bitwise_identical(trained, tmp_path, monkeypatch):
    from tasks.arithmetic import Arithmetic

    base = link_base_dir(trained, tmp_path, monkeypatch, checkpoints=["base", "mid", "sft"])
    # the tiny model never gets a sum right: reward an even-length answer, so that there is something to learn
    monkeypatch.setattr(Arithmetic, "evaluate", lambda self, conversation, text: len(text) % 2 == 0)
    flags = CHAT + ["--num-iterations", "4", "--save-every", "2", "--keep-last", "-1", "--eval-every", "2",
                    "--examples-per-step", "2", "--num-samples", "4", "--max-new-tokens", "10", "--eval-problems", "4",
                    "--eval-samples", "2", "--device-batch-size", "4"]
    resume_is_exact("rl", chat_rl.main, flags)
    data = json.loads((base / "report" / "chat-rl.json").read_text())
    assert data["started_from"].startswith("sft d2 step 6") and len(data["curve"]["reward"]) == 4
    assert data["curve"]["pass_step"] == [0, 2, 4] and 0 <= data["held_out_pass@2"]["end"] <= 1


def test_the_summary_has_an_rl_column_once_rl_is_evaluated(tmp_path, monkeypatch):
    import report

    monkeypatch.setenv("SPEEDCHAT_BASE_DIR", str(tmp_path))
    report.write_section("chat-eval-sft", "SFT", {"results": {"GSM8K": {"acc": 0.04, "se": 0.01}}})
    assert report.summary_table().startswith("| metric | BASE | MID | SFT |\n|---|---|---|---|\n")
    report.write_section("chat-eval-rl", "RL", {"results": {"GSM8K": {"acc": 0.07, "se": 0.01}}, "max_problems": 9})
    table = report.summary_table()
    assert "| GSM8K | - | - | 0.0400 ± 0.0100 | 0.0700 ± 0.0100 |" in table and "RL: at most 9 problems" in table

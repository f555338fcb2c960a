"""chat_cli.py on a tiny checkpoint: one-shot and interactive chat, the decode switch, a conversation
longer than the context (the oldest turns are dropped, answers keep coming), tool calls shown
readably, and the message shown when a stage has no checkpoint yet."""

import argparse
import io

import pytest
import torch

import chat_cli
import engine
from common import UserError
from test_engine import Scripted, make_model, make_tokenizer, save_tiny_checkpoint, script


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDCHAT_BASE_DIR", str(tmp_path))
    return tmp_path


def test_missing_checkpoint_says_which_script_to_run(base_dir):
    with pytest.raises(UserError, match="run `python -m chat_sft` first"):
        chat_cli.main(["-p", "hi"])
    with pytest.raises(UserError, match="run `python -m base_train` first"):
        chat_cli.main(["-p", "hi", "--source", "base"])
    with pytest.raises(SystemExit):  # argparse refuses it before anything loads
        chat_cli.main(["-p", "hi", "--top-p", "0"])


def test_one_shot_is_deterministic_on_both_decode_paths(base_dir, capsys, monkeypatch):
    """--decode compiled (its step run as written: torch.compile = identity) says what eager says."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    save_tiny_checkpoint(base_dir, stage="sft")
    ask = ["-p", "Hello! How are you?", "--max-tokens", "12", "--temperature", "0", "--device", "cpu"]
    answers = []
    for decode in ("eager", "eager", "compiled"):
        capsys.readouterr()
        chat_cli.main(ask + ["--decode", decode])
        answers.append(capsys.readouterr().out)
    assert answers[0].strip() and answers == [answers[0]] * 3


def test_interactive_history_clear_and_a_full_context(base_dir, capsys, monkeypatch):
    save_tiny_checkpoint(base_dir, stage="mid")  # a 256-token context
    long = "What is the capital of France? How many r are in strawberry? " * 2  # ~40 tokens
    lines = iter(["Hello!", "What is the capital of France?", "/clear", "  ", "/help", "How many r?"]
                 + [long] * 8 + [long * 10, "Still there?", "/exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    seen, real_fit = [], engine.fit_prompt

    def spy(tokenizer, messages, budget):
        ids, dropped = real_fit(tokenizer, messages, budget)
        seen.append((len(messages), dropped, ids is not None and len(ids) <= budget))
        return ids, dropped

    monkeypatch.setattr(chat_cli, "fit_prompt", spy)
    chat_cli.main(["--source", "mid", "--max-tokens", "8", "--device", "cpu", "--temperature", "0"])
    out = capsys.readouterr().out
    # the second question sees the first exchange; /clear starts over; blank lines and unknown commands are
    # not sent; then the context fills: the oldest turns are dropped and every question still gets an answer
    assert seen[:3] == [(1, 0, True), (3, 0, True), (1, 0, True)]
    assert any(dropped for _, dropped, _ in seen[3:])
    assert [fits for _, _, fits in seen].count(False) == 1  # only the message longer than the context alone
    assert out.count("Assistant: ") == len(seen) == 13
    assert "no longer fit the model's context" in out and "that message alone is longer" in out
    assert "(new conversation)" in out and "(unknown command /help" in out
    assert next(lines) == "never read"


def test_eof_ends_the_chat(base_dir, capsys, monkeypatch):
    save_tiny_checkpoint(base_dir, stage="sft")

    def eof(prompt=""):
        raise EOFError

    monkeypatch.setattr("builtins.input", eof)
    chat_cli.main(["--device", "cpu"])
    assert "speedchat (sft" in capsys.readouterr().out


def test_tool_calls_are_shown_readably():
    tok = make_tokenizer()
    special = tok.encode_special
    messages = [{"role": "user", "content": "What is 12+30?"}]
    start = len(engine.chat_prompt(tok, messages))
    call = [special("<|python_start|>"), *tok.encode("12+30"), special("<|python_end|>")]
    after = start + len(call) + 3  # the engine forces <|output_start|> 42 <|output_end|> in between
    assert len(tok.encode("42")) == 1, "the line above assumes 42 is one token"
    says = tok.encode(" It is 42.") + [special("<|assistant_end|>")]
    chat = engine.Engine(Scripted(make_model(tok.get_vocab_size()), [script(start, call) | script(after, says)]), tok)
    args = argparse.Namespace(max_tokens=40, temperature=0.0, top_k=0, top_p=1.0, seed=0)
    out = io.StringIO()
    text, dropped = chat_cli.reply(chat, messages, args, 0, out)
    assert out.getvalue() == "[calculator: 12+30 -> 42] It is 42.\n" and dropped == 0
    assert text == "[calculator: 12+30 -> 42] It is 42."  # read back as tokens: test_engine's round trip

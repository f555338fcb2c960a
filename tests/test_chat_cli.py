"""chat_cli.py: one-shot and interactive chat on a tiny checkpoint, the decode switch, and the
message shown when a stage has no checkpoint yet."""

import pytest
import torch

import chat_cli
from common import UserError
from test_engine import save_tiny_checkpoint


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


def test_one_shot_prompt(base_dir, capsys):
    save_tiny_checkpoint(base_dir, stage="sft")
    capsys.readouterr()
    chat_cli.main(["-p", "Hello! How are you?", "--max-tokens", "12", "--temperature", "0", "--device", "cpu"])
    first = capsys.readouterr().out
    assert first.strip()  # a random model says something
    chat_cli.main(["-p", "Hello! How are you?", "--max-tokens", "12", "--temperature", "0", "--device", "cpu"])
    assert capsys.readouterr().out == first  # greedy is deterministic


def test_decode_switch(base_dir, capsys, monkeypatch):
    """--decode compiled (its step run as written: torch.compile = identity) says what eager says."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    save_tiny_checkpoint(base_dir, stage="sft")
    capsys.readouterr()
    ask = ["-p", "Hello! How are you?", "--max-tokens", "12", "--temperature", "0", "--device", "cpu"]
    chat_cli.main(ask + ["--decode", "eager"])
    eager = capsys.readouterr().out
    chat_cli.main(ask + ["--decode", "compiled"])
    assert capsys.readouterr().out == eager


def test_interactive_history_clear_exit(base_dir, capsys, monkeypatch):
    save_tiny_checkpoint(base_dir, stage="mid")
    lines = iter(["Hello!", "What is the capital of France?", "/clear", "  ", "/help", "How many r?", "/exit",
                  "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    seen = []
    real_prompt = chat_cli.chat_prompt

    def spy(tokenizer, messages):
        seen.append([m["role"] for m in messages])
        return real_prompt(tokenizer, messages)

    monkeypatch.setattr(chat_cli, "chat_prompt", spy)
    chat_cli.main(["--source", "mid", "--max-tokens", "8", "--device", "cpu"])
    out = capsys.readouterr().out
    # the second question sees the first exchange; /clear starts over; blank lines and unknown commands
    # are not sent
    assert seen == [["user"], ["user", "assistant", "user"], ["user"]]
    assert out.count("Assistant: ") == 3
    assert "(new conversation)" in out
    assert "(unknown command /help: /clear starts over, /exit leaves)" in out
    assert next(lines) == "never read"


def test_eof_ends_the_chat(base_dir, capsys, monkeypatch):
    save_tiny_checkpoint(base_dir, stage="sft")

    def eof(prompt=""):
        raise EOFError

    monkeypatch.setattr("builtins.input", eof)
    chat_cli.main(["--device", "cpu"])
    assert "speedchat (sft" in capsys.readouterr().out


def test_tool_calls_are_shown_readably_and_kept_as_tokens():
    import argparse
    import io

    from engine import Engine
    from test_engine import Scripted, make_model, make_tokenizer, script

    tok = make_tokenizer()
    special = tok.encode_special
    messages = [{"role": "user", "content": "What is 12+30?"}]
    start = len(chat_cli.chat_prompt(tok, messages))
    call = [special("<|python_start|>"), *tok.encode("12+30"), special("<|python_end|>")]
    after = start + len(call) + 3  # the engine forces <|output_start|> 42 <|output_end|> in between
    assert len(tok.encode("42")) == 1, "the line above assumes 42 is one token"
    says = tok.encode(" It is 42.") + [special("<|assistant_end|>")]
    engine = Engine(Scripted(make_model(tok.get_vocab_size()), [script(start, call) | script(after, says)]), tok)
    args = argparse.Namespace(max_tokens=40, temperature=0.0, top_k=0, top_p=1.0, seed=0)
    out = io.StringIO()
    text = chat_cli.reply(engine, messages, args, 0, out)
    assert out.getvalue() == "[calculator: 12+30 -> 42] It is 42.\n"
    assert text == "<|python_start|>12+30<|python_end|><|output_start|>42<|output_end|> It is 42."

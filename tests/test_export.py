"""export.py: the Hugging Face folder loads with transformers and computes what we compute: the same
logits, the same greedy tokens, the same token ids, the same rendered conversations."""

import argparse
import inspect
import json
import random
from dataclasses import asdict

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import checkpoint
import export
from conftest import assert_close, link_base_dir
from engine import Engine
from test_engine import make_model
from tokenizer import Tokenizer

MIXED = "Hello world! 12345 café, naïve 😀 — tabs\tand\n\nnewlines  spaces. def f(x):\n    return x**2 # ok"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tokenizer trained on real text (Python's own sources) and a random model, exported in fp32."""
    tok = Tokenizer.train_from_iterator([inspect.getsource(m) for m in (argparse, json, random)], vocab_size=1200)
    base = tmp_path_factory.mktemp("base")
    tok.save(base / "tokenizer")
    model = make_model(tok.get_vocab_size(), sequence_len=256)  # windows of 128 on the short layers
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPEEDCHAT_BASE_DIR", str(base))
        checkpoint.save_checkpoint("sft", "d2", 1, model, None, {"model_config": asdict(model.config)})
        out = export.export("sft", base / "hf", dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    return out, tok, model, hf, hf_tok


def test_logits_and_greedy_tokens_match_ours(folder):
    _, tok, model, hf, _ = folder
    long_prompt = tok.encode(MIXED * 8, prepend="<|bos|>")[:200]  # longer than the 128-token window
    assert len(long_prompt) == 200
    for ids in (tok.encode("Hello", prepend="<|bos|>"), tok.encode(MIXED, prepend="<|bos|>"), long_prompt):
        with torch.no_grad():
            assert_close(hf(torch.tensor([ids])).logits, model(torch.tensor([ids])), atol=1e-4, rtol=0)
    prompt = tok.encode("The quick brown fox", prepend="<|bos|>")
    ours, _ = Engine(model, tok, decode="eager").generate_batch(prompt, max_tokens=32, temperature=0.0)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0].tolist()
    assert len(ours[0]) == len(prompt) + 32 and theirs == ours[0]


def test_tokenizer_and_chat_template_match(folder):
    _, tok, _, _, hf_tok = folder
    assert hf_tok.encode(MIXED) == tok.encode(MIXED)
    # our tokenizer reads special-token strings in plain text as text; transformers needs to be told
    assert hf_tok.encode("say <|bos|> now", split_special_tokens=True) == tok.encode("say <|bos|> now")
    for name in tok.get_special_tokens():  # special tokens round-trip
        assert hf_tok.convert_tokens_to_ids(name) == tok.encode_special(name)
        assert hf_tok.decode([tok.encode_special(name)]) == name
    conversation = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12*7?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me compute: "},
                                          {"type": "python", "text": "12*7"},
                                          {"type": "python_output", "text": "84"},
                                          {"type": "text", "text": "It is 84."}]},
        {"role": "user", "content": MIXED}]}
    ids = hf_tok.apply_chat_template(conversation["messages"], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert list(ids) == tok.render_for_completion(conversation)


def test_trained_model_and_its_card(trained, tmp_path, monkeypatch):
    """The session's trained sft model: same logits through transformers, and a card built from its report."""
    import yaml

    link_base_dir(trained, tmp_path, monkeypatch, checkpoints=["sft"])
    (tmp_path / "report").symlink_to(trained / "report")
    out = export.export("sft", tmp_path / "hf", dtype="float32")
    model, tok, _ = checkpoint.load_model("sft", "cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    x = torch.tensor([tok.encode("def main():\n    return", prepend="<|bos|>")])
    with torch.no_grad():
        assert_close(hf(x).logits, model(x), atol=1e-4, rtol=0)
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["pipeline_tag"] == "text-generation" and front["license"] and "speedchat" in front["tags"]
    assert "| metric | BASE | MID | SFT |" in card and "parameters" in card and "stdlib-docs" in card
    exec(export.USAGE.replace("PATH", str(out)), {})  # the card's snippet runs as written

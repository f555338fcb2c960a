"""Export a trained model as a Hugging Face folder: weights, config, tokenizer, chat template, model card.

    python -m export --source sft --out my-model         # then: huggingface-cli upload NAME my-model
    python -m export --source base --tag d24 --step 5568 --dtype float32 --out d24-base

The folder loads with transformers (`pip install transformers safetensors`; USAGE below).
transformers' own `nanochat` model type ports nanochat's late-2025 architecture; ours has grown past it
(value embeddings, sliding windows, per-layer scalars, smear, backout), so the folder carries its
modeling code instead: hf_modeling.py, a thin wrapper around a copy of this project's model.py. What
transformers computes is therefore what speedchat computes, whatever the architecture becomes.
The tokenizer is our tiktoken ranks written as a byte-level BPE for the `tokenizers` library, and the
chat template renders a conversation exactly as Tokenizer.render_for_completion does.
"""

import argparse
import json
from pathlib import Path

import torch

from common import UserError, atomic_path, atomic_write, print0, run_main

REPO = Path(__file__).resolve().parent
CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for m in messages %}"
    "{% if m.role == 'system' %}{% set ns.system = m.content + '\n\n' %}"
    "{% elif m.role == 'user' %}<|user_start|>{{ ns.system + m.content }}<|user_end|>{% set ns.system = '' %}"
    "{% else %}<|assistant_start|>"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}"
    "{% if p.type == 'text' %}{{ p.text }}"
    "{% elif p.type == 'python' %}<|python_start|>{{ p.text }}<|python_end|>"
    "{% else %}<|output_start|>{{ p.text }}<|output_end|>{% endif %}"
    "{% endfor %}{% endif %}<|assistant_end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant_start|>{% endif %}"
)


def bpe_merges(ranks):
    """The merges that rebuild tiktoken's ranks in the `tokenizers` BPE: every split of a token into two
    tokens of lower rank, with the token's rank as its priority (tiktoken always merges the adjacent pair
    whose union has the lowest rank)."""
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = ranks.get(token[:i]), ranks.get(token[i:])
            if left is not None and right is not None and left < rank and right < rank:
                merges.append((rank, left, right, token[:i], token[i:]))
    return [(a, b) for _, _, _, a, b in sorted(merges)]


def hf_tokenizer(tok):
    """Our Tokenizer as a transformers PreTrainedTokenizerFast with the same ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tokenizer import gpt2_byte_decoder

    as_text = {b: ch for ch, b in gpt2_byte_decoder().items()}  # byte-level BPE's printable bytes
    text = lambda token: "".join(as_text[b] for b in token)
    vocab = {text(token): rank for token, rank in tok.mergeable_ranks.items()}
    merges = [(text(a), text(b)) for a, b in bpe_merges(tok.mergeable_ranks)]
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))  # whole pieces first, as tiktoken
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(tok.pattern), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in tok.get_special_tokens()])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|assistant_end|>",
                                   pad_token="<|assistant_end|>", chat_template=CHAT_TEMPLATE,
                                   model_max_length=None)


def modeling_files():
    """The code the folder carries: hf_modeling.py and the project's model.py and attention.py, whose
    imports of each other become relative (transformers loads them as one package). optim.py stays home:
    the model imports it only to train."""
    files = {name: (REPO / name).read_text(encoding="utf-8") for name in ("hf_modeling.py", "model.py", "attention.py")}
    rewrites = {"model.py": ("from attention import", "from .attention import"),
                "attention.py": ("from common import print0", "print0 = print")}
    for name, (old, new) in rewrites.items():
        assert files[name].count(old) == 1, f"{name} no longer has `{old}`: update export.modeling_files"
        files[name] = files[name].replace(old, new)
    return files


def export(source, out, tag=None, step=None, dtype="bfloat16", license="mit"):
    """Write the folder; returns its path."""
    import checkpoint
    from safetensors.torch import save_file

    model, tok, meta = checkpoint.load_model(source, "cpu", tag=tag, step=step)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {f"gpt.{k}": v.to(getattr(torch, dtype)).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    for name, text in modeling_files().items():
        atomic_write(out / name, text)
    stop = [tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()]
    config = {
        "architectures": ["SpeedchatForCausalLM"], "model_type": "speedchat",
        "auto_map": {"AutoConfig": "hf_modeling.SpeedchatConfig",
                     "AutoModelForCausalLM": "hf_modeling.SpeedchatForCausalLM"},
        "gpt": meta["model_config"], "torch_dtype": dtype, "vocab_size": meta["model_config"]["vocab_size"],
        "bos_token_id": tok.get_bos_token_id(), "eos_token_id": stop, "use_cache": False,
    }
    atomic_write(out / "config.json", json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": tok.get_bos_token_id(), "eos_token_id": stop, "pad_token_id": stop[0],
                  "use_cache": False, "max_length": meta["model_config"]["sequence_len"]}
    atomic_write(out / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    hf_tokenizer(tok).save_pretrained(out)
    atomic_write(out / "README.md", model_card(source, meta, license))
    print0(f"exported {source} {meta['tag']} step {meta['step']} to {out}")
    return out


USAGE = """from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("PATH", trust_remote_code=True)
chat = [{"role": "user", "content": "Why is the sky blue?"}]
inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**inputs, max_new_tokens=128, do_sample=True, temperature=0.6, top_k=50)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))"""
# the Hub names of the data a stage may have trained on (the card's `datasets`)
HUB_DATASETS = {"fineweb-edu": "HuggingFaceFW/fineweb-edu", "climbmix": "nvidia/Nemotron-ClimbMix",
                "full": ["HuggingFaceTB/smol-smoltalk", "cais/mmlu", "openai/gsm8k", "allenai/ai2_arc"]}


def model_card(source, meta, license="mit"):
    """README.md for the Hub: YAML front matter, what was trained on what and what it cost (from the
    run's report sections), the report's evaluation table with standard errors, and how to use it."""
    import report

    tag = report.run_tag()
    train, header = report.read_data("base-train", tag), report.read_data("header", tag)
    presets = {report.read_data(s, tag).get("preset") for s in ("chat-eval-mid", "chat-eval-sft")}
    datasets = [HUB_DATASETS[train["source"]]] if train.get("source") in HUB_DATASETS else []
    datasets += HUB_DATASETS["full"] if "full" in presets else []
    front = ["---", f"license: {license}", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [speedchat, custom_code, text-generation]"]
    front += [f"datasets: [{', '.join(datasets)}]"] if datasets else []
    front += ["metrics: [accuracy]", "---", ""]
    lines = [f"# speedchat {meta['tag']} ({source})", "",
             "A small chat model trained from scratch with speedchat in one run: "
             "tokenizer, pretraining, mid-training and fine-tuning.", ""]
    if train:
        hours = train.get("training_seconds", 0) / 3600
        lines += [f"- model: depth {train.get('depth')}, {train.get('parameters', 0):,} parameters, "
                  f"context {train.get('sequence_length')} tokens, vocabulary {train.get('vocab_size'):,}",
                  f"- pretraining: {train.get('training_tokens', 0):,} tokens of {train.get('source')} on "
                  f"{train.get('device')} in {hours:.2f} h"]
    if header.get("gpus"):
        lines.append(f"- machine: {header['gpus']}, torch {header.get('torch')}, code {header.get('git_commit')}")
    lines += [f"- this checkpoint: {source} {meta['tag']} step {meta['step']}", "",
              "## Evaluation", "", report.summary_table(tag), "",
              "## Use", "", "```python",
              USAGE.replace("PATH", "."), "```", "", "(`.` is this folder; on the Hub, its id.)", "",
              "The modeling code (`hf_modeling.py` around speedchat's own `model.py`) ships in this folder, hence "
              "`trust_remote_code=True`: transformers' native `nanochat` type predates this architecture (value "
              "embeddings, sliding windows, per-layer scalars, smear, backout). Generation recomputes the whole "
              "sequence at each token (no KV cache) and does not run the calculator tool the model was trained "
              "to call; speedchat's own `chat_cli`/`chat_web` do both. Special-token strings typed in plain text "
              "are text to speedchat's tokenizer: pass `split_special_tokens=True` to get the same ids.", ""]
    return "\n".join(front + lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Export a checkpoint as a Hugging Face folder (safetensors, config, "
                                            "tokenizer, chat template, model card).")
    p.add_argument("--source", default="sft", choices=["base", "mid", "sft", "rl"], help="which stage (default: sft)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the latest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="weights (default: bfloat16)")
    p.add_argument("--license", default="mit", help="the model card's license (a Hub license id; default: mit)")
    p.add_argument("--out", required=True, help="the folder to write")
    args = p.parse_args(argv)
    try:
        import safetensors, transformers  # noqa: F401
    except ImportError:
        raise UserError("export needs transformers and safetensors: `bash setup_env.sh` in the repo installs "
                        "them into .venv")
    export(args.source, args.out, args.tag, args.step, args.dtype, args.license)


if __name__ == "__main__":
    run_main(main)

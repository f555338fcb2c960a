"""Chat with a trained model in the terminal.

    python -m chat_cli                      # interactive, the latest sft checkpoint
    python -m chat_cli -p "Why is the sky blue?"   # one answer, then exit
    python -m chat_cli --source mid --temperature 0.8 --top-k 50

Type /clear to start a new conversation and /exit (or Ctrl-D) to leave. Replies stream as
they are generated; the conversation so far is the context of every reply.
"""

import sys
import argparse

from common import POSITIVE, RATE, UserError, checked, resolve_device, run_main
from engine import StreamDecoder, add_model_flags, fit_prompt, load_engine, shown


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Chat with a speedchat model in the terminal.")
    p.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit (default: interactive)")
    add_model_flags(p, "load")
    p.add_argument("--temperature", type=RATE, default=0.6, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=checked(int, lambda v: v >= 0, ">= 0"), default=50,
                   help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=checked(float, lambda v: 0 < v <= 1, "in (0, 1]"), default=1.0,
                   help="nucleus sampling: smallest set with this much mass, in (0, 1]")
    p.add_argument("--max-tokens", type=POSITIVE, default=512, help="at most this many tokens per reply")
    p.add_argument("--seed", type=int, default=42, help="random seed (each reply uses seed + turn number)")
    return p.parse_args(argv)


def reply(engine, messages, args, turn, out=None):
    """Stream the assistant's answer to `messages` into `out`: (its text as shown, how many of the
    oldest messages the model could not see), or (None, ...) when the last message alone is longer
    than the model's context. Up to half the context is kept for the reply."""
    context = engine.model.config.sequence_len
    ids, dropped = fit_prompt(engine.tokenizer, messages, context - min(args.max_tokens, context // 2))
    if ids is None:
        return None, dropped
    out = out or sys.stdout
    if dropped:
        out.write(f"(the oldest {dropped} messages no longer fit the model's context: it answers without them)\n")
    decoder = StreamDecoder(engine.tokenizer)
    stream = engine.generate(ids, num_samples=1, max_tokens=min(args.max_tokens, context - len(ids)),
                             temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, seed=args.seed + turn)
    for column, _ in stream:
        if column[0] in engine.stop_tokens:
            break
        out.write(shown(decoder.add(column[0])))
        out.flush()
    out.write(shown(decoder.flush()) + "\n")
    out.flush()
    return shown(decoder.text()), dropped


def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    engine, meta = load_engine(args.source, device, args.tag, args.step, args.decode)
    if engine.compiles:
        print("(the first reply waits for the decode step to compile: tens of seconds)", file=sys.stderr)
    if args.prompt is not None:
        if reply(engine, [{"role": "user", "content": args.prompt}], args, 0)[0] is None:
            raise UserError("the prompt is longer than the model's context: shorten it")
        return
    print(f"speedchat ({args.source} {meta.get('tag', '')}, step {meta.get('step', '?')}, {device}). "
          "/clear starts over, /exit leaves.", flush=True)
    messages, turn = [], 0
    while True:
        try:
            line = input("\nUser: ")
        except EOFError:
            print()
            return
        command = line.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/clear":
            messages = []
            print("(new conversation)")
            continue
        if not command:
            continue
        if command.startswith("/") and " " not in command:  # a mistyped command is not a question
            print(f"(unknown command {command}: /clear starts over, /exit leaves)")
            continue
        messages.append({"role": "user", "content": line})
        print("\nAssistant: ", end="", flush=True)
        try:
            text, dropped = reply(engine, messages, args, turn)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            print("\n(reply interrupted)")
            text = dropped = None
        if text is None:  # no reply: its question leaves the history too
            messages.pop()
            if dropped is not None:
                print("(that message alone is longer than the model's context: shorten it)")
            continue
        messages = messages[dropped:] + [{"role": "assistant", "content": text}]
        turn += 1


if __name__ == "__main__":
    run_main(main)

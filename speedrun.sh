#!/usr/bin/env bash
# speedrun: train a small ChatGPT end to end and write report.md.
#
#   bash speedrun.sh                 # 8xH100 (or any number of CUDA GPUs): d24, GPT-2 grade, a few hours
#   SPEEDCHAT_DEPTH=20 bash speedrun.sh      # the cheap tier: d20, about a third of the pretraining time
#   bash speedrun.sh                 # no CUDA GPU: the tiny offline CPU preset, a few minutes
#   SPEEDCHAT_PRESET=cpu bash speedrun.sh    # force the CPU preset
#   SPEEDCHAT_SKIP_RL=1 bash speedrun.sh     # stop after SFT (no reinforcement learning stage)
#
# Re-running after an interruption resumes: finished stages are skipped (a marker per stage
# under $SPEEDCHAT_BASE_DIR/speedrun/) and an interrupted training resumes from its last
# checkpoint. To start over from scratch, remove the markers and the checkpoints:
#   rm -rf $SPEEDCHAT_BASE_DIR/speedrun $SPEEDCHAT_BASE_DIR/checkpoints
set -euo pipefail
CALLER_DIR=$PWD  # report.md is copied here at the end
export SPEEDCHAT_BASE_DIR="${SPEEDCHAT_BASE_DIR:-$HOME/.cache/speedchat}"
mkdir -p "$SPEEDCHAT_BASE_DIR"
SPEEDCHAT_BASE_DIR=$(CDPATH= cd -- "$SPEEDCHAT_BASE_DIR" && pwd)  # a relative one is relative to where you ran this
cd "$(dirname "$0")"

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# --- process handling: torchrun starts its workers in sessions of their own, so neither Ctrl-C nor a
# kill of this script's process group reaches them. Every process of this run carries SPEEDRUN_ID in
# its environment; on exit, on a signal, and (through a watcher in a session of its own) when this
# script is killed outright, every process that carries it is killed.
export SPEEDRUN_ID="$$-$(date +%s%N)"
kill_run() {
    local environ pid
    for environ in /proc/[0-9]*/environ; do
        pid=${environ#/proc/}; pid=${pid%/environ}
        if [ "$pid" != "$$" ] && grep -qsxzF "SPEEDRUN_ID=$1" "$environ"; then kill -KILL "$pid" 2>/dev/null; fi
    done
}
if [ -d /proc/self ]; then
    trap 'kill_run "$SPEEDRUN_ID"' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM HUP
    if command -v setsid >/dev/null 2>&1; then
        env -u SPEEDRUN_ID setsid bash -c "while kill -0 $$ 2>/dev/null; do sleep 2; done; $(declare -f kill_run); kill_run $SPEEDRUN_ID" \
            </dev/null >/dev/null 2>&1 &
    fi
fi

# --- environment: Rust (installed when missing and the network allows), uv, .venv, rustbpe
if ! command -v cargo >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo" ] && command -v curl >/dev/null 2>&1; then
    echo "Rust is missing: installing it with rustup"
    curl --proto '=https' --tlsv1.2 -sSf --max-time 120 https://sh.rustup.rs | sh -s -- -y --profile minimal >/dev/null \
        || { echo "error: could not install Rust: install it from https://rustup.rs and re-run" >&2; exit 1; }
fi
source ./setup_env.sh
PY="uv run --no-sync python"

NGPU=$($PY -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if [ "$NGPU" = 0 ] && [ -z "${SPEEDCHAT_PRESET:-}" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
    DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
    CUDA=$($PY -c 'import torch; print(torch.version.cuda)')
    echo "error: nvidia-smi sees GPUs but torch (built for CUDA $CUDA) cannot use them: driver $DRIVER is probably too old." \
         "Update the driver, or install a torch build for your CUDA (e.g. uv pip install torch --index-url https://download.pytorch.org/whl/cu128)." \
         "SPEEDCHAT_PRESET=cpu runs the CPU preset anyway." >&2
    exit 1
fi
PRESET=${SPEEDCHAT_PRESET:-$([ "$NGPU" -gt 0 ] && echo gpu || echo cpu)}
case "$PRESET" in
    gpu) [ "$NGPU" -gt 0 ] || { echo "error: SPEEDCHAT_PRESET=gpu but torch sees no CUDA GPU: unset it to run the CPU preset" >&2; exit 1; } ;;
    cpu) ;;
    *) echo "error: SPEEDCHAT_PRESET must be gpu or cpu, not '$PRESET'" >&2; exit 1 ;;
esac
DONE="$SPEEDCHAT_BASE_DIR/speedrun"
mkdir -p "$DONE"
echo "speedrun: preset $PRESET, $NGPU GPU(s), artifacts in $SPEEDCHAT_BASE_DIR"

# stage NAME CMD...: run CMD unless NAME finished in an earlier run
stage() {
    local name=$1; shift
    if [ -f "$DONE/$name" ]; then echo "== $name: done in an earlier run, skipped"; return 0; fi
    echo "== $name"
    local t0=$SECONDS
    "$@" &  # waited for in the background, so that a signal reaches our traps at once
    wait $!
    touch "$DONE/$name"
    echo "== $name: $((SECONDS - t0))s"
}
# resume_flag STAGE: --resume when that training stage already saved a checkpoint
resume_flag() {
    if compgen -G "$SPEEDCHAT_BASE_DIR/checkpoints/$1/*/meta_*.json" >/dev/null; then echo --resume; fi
}
if [ "$PRESET" = gpu ]; then
    RUN="uv run --no-sync torchrun --standalone --nproc_per_node=$NGPU"
else
    RUN="uv run --no-sync torchrun --standalone --nproc_per_node=1"
fi

stage report-reset $PY -m report reset

if [ "$PRESET" = gpu ]; then
    # d24 on 8 tokens per scaling parameter: the GPT-2-grade run (SPEEDCHAT_DEPTH=20: the cheap tier).
    # The plan (plan.py) sizes it for these GPUs first: shards to download, rows per GPU, memory, disk.
    DEPTH=${SPEEDCHAT_DEPTH:-24}
    PLAN="$SPEEDCHAT_BASE_DIR/plan-d$DEPTH.json"
    $PY -m plan --depth "$DEPTH" --ratio 8 --json --check > "$PLAN" \
        || { echo "error: d$DEPTH does not fit this machine (see the plan above): free disk, use GPUs with more memory, or SPEEDCHAT_DEPTH=20" >&2; exit 1; }
    plan_value() { $PY -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$PLAN" "$1"; }
    SHARDS=$(plan_value shards_needed); DEVICE_BATCH=$(plan_value device_batch_size)
    FP8=$($PY -c 'import torch, fp8; print("--fp8" if fp8.fp8_supported(torch.device("cuda"))[0] else "")')
    stage data-first $PY -m dataset --source climbmix -n 8
    $PY -m dataset --source climbmix -n "$SHARDS" > "$SPEEDCHAT_BASE_DIR/download.log" 2>&1 &
    DOWNLOAD_PID=$!
    stage tokenizer-train $PY -m tokenizer.train --source climbmix --vocab-size 32768 --max-chars 2000000000
    stage tokenizer-eval $PY -m tokenizer.eval --source climbmix
    echo "waiting for the shard download (log: $SPEEDCHAT_BASE_DIR/download.log)"
    wait $DOWNLOAD_PID || { echo "error: the shard download failed: see $SPEEDCHAT_BASE_DIR/download.log" >&2; exit 1; }
    # The batch sizes of nanochat's d20 recipe, rounded up so that any number of GPUs divides them.
    round_up() { echo $(( ($1 + $2 - 1) / $2 * $2 )); }
    TOKENS_PER_STEP=$(round_up 524288 $((DEVICE_BATCH * 2048 * NGPU)))   # the plan's rows of 2048 tokens per GPU
    SFT_EXAMPLES=$(round_up 32 $((4 * NGPU)))                  # 4 conversations per GPU
    stage base-train $RUN -m base_train -- --depth "$DEPTH" --target-param-data-ratio 8 \
        --device-batch-size "$DEVICE_BATCH" $FP8 $(resume_flag base)
    stage base-eval $RUN -m base_eval
    stage mid-train $RUN -m mid_train -- --preset full --device-batch-size "$DEVICE_BATCH" --total-batch-size $TOKENS_PER_STEP $(resume_flag mid)
    stage chat-eval-mid $RUN -m chat_eval -- --source mid
    stage chat-sft $RUN -m chat_sft -- --preset full --examples-per-step $SFT_EXAMPLES $(resume_flag sft)
    stage chat-eval-sft $RUN -m chat_eval -- --source sft
    # RL: one pass over GSM8K train, 16 problems (rounded up to the GPUs) x 16 answers per step: ~470 steps
    RL_FLAGS="--preset full --examples-per-step $(round_up 16 $NGPU)" RL_EVAL="--task-name GSM8K"
else
    # The offline CPU preset: the stdlib-docs corpus, a tiny model, self-generated chat tasks.
    TINY="--depth 2 --aspect-ratio 64 --head-dim 32 --max-seq-len 128 --device-batch-size 8 --total-batch-size 1024"
    stage data $PY -m dataset --source stdlib-docs
    stage tokenizer-train $PY -m tokenizer.train --source stdlib-docs --vocab-size 2048 --max-chars 20000000
    stage tokenizer-eval $PY -m tokenizer.eval --source stdlib-docs
    stage base-train $RUN -m base_train -- $TINY --source stdlib-docs --num-iterations 300 \
        --eval-every 100 --eval-tokens 32768 --sample-every 150 --save-every 100 $(resume_flag base)
    stage base-eval $RUN -m base_eval -- --eval bpb,sample --split-tokens 32768
    stage mid-train $RUN -m mid_train -- --preset offline --max-seq-len 128 --device-batch-size 8 --num-iterations 150 $(resume_flag mid)
    stage chat-eval-mid $RUN -m chat_eval -- --source mid --max-problems 50
    stage chat-sft $RUN -m chat_sft -- --preset offline --device-batch-size 8 --num-iterations 100 $(resume_flag sft)
    stage chat-eval-sft $RUN -m chat_eval -- --source sft --max-problems 50
    # RL on arithmetic, briefly; the tiny model needs a larger fraction of the lr (0.5 collapses it)
    RL_FLAGS="--preset offline --num-iterations 20 --examples-per-step 8 --num-samples 8 --max-new-tokens 64
              --eval-problems 32 --device-batch-size 32 --init-lr-frac 0.2" RL_EVAL="--max-problems 50"
fi
if [ "${SPEEDCHAT_SKIP_RL:-0}" != 1 ]; then
    stage chat-rl $RUN -m chat_rl -- $RL_FLAGS $(resume_flag rl)
    stage chat-eval-rl $RUN -m chat_eval -- --source rl $RL_EVAL
fi

$PY -m report generate --out-dir "$CALLER_DIR"
echo "done: read $CALLER_DIR/report.md, then chat with: uv run python -m chat_cli   (or: uv run python -m chat_web)"

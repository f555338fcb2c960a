#!/usr/bin/env bash
# speedrun: train a small ChatGPT end to end and write report.md.
#
#   bash speedrun.sh                              # CUDA GPUs: d24, GPT-2 grade (a few hours on 8xH100); no GPU: the CPU preset (minutes)
#   SPEEDCHAT_DEPTH=20 bash speedrun.sh           # the cheap tier: d20, about a third of the pretraining time
#   SPEEDCHAT_PRESET=cpu-learn bash speedrun.sh   # a laptop: a d4 model on a few real shards that learns some English
#
# Knobs (environment variables; every one optional):
#   SPEEDCHAT_PRESET      gpu | cpu | cpu-learn (default: gpu when torch sees a CUDA GPU, else cpu)
#   SPEEDCHAT_DEPTH       model depth (default: 24 gpu, 4 cpu-learn, 2 cpu)
#   SPEEDCHAT_SOURCE      pretraining data: climbmix | fineweb-edu | stdlib-docs | dir:PATH
#                         (default: climbmix gpu, fineweb-edu cpu-learn, stdlib-docs cpu)
#   SPEEDCHAT_SHARDS      shards to download (default: what the plan needs on gpu, 4 cpu-learn)
#   SPEEDCHAT_NGPU        how many GPUs to use (default: all)
#   SPEEDCHAT_RERUN       stages to run again, comma-separated (e.g. base-eval, or base-train: it and every later stage)
#   SPEEDCHAT_SKIP_RL     1 = stop after SFT (no reinforcement learning stage)
#   SPEEDCHAT_SKIP_SETUP  1 = use .venv as it is (no Rust/uv install, no uv sync)
#   SPEEDCHAT_BASE_DIR    where everything is written (default: ~/.cache/speedchat)
#
# Running it again resumes: a stage that finished with the same command is skipped (a marker per stage
# under $SPEEDCHAT_BASE_DIR/speedrun/), an interrupted training goes on from its last checkpoint, and a
# stage whose command changed (another depth, source, preset) runs afresh, with every stage after it.
set -euo pipefail
CALLER_DIR=$PWD  # report.md is copied here at the end
export SPEEDCHAT_BASE_DIR="${SPEEDCHAT_BASE_DIR:-$HOME/.cache/speedchat}"
mkdir -p "$SPEEDCHAT_BASE_DIR"
SPEEDCHAT_BASE_DIR=$(CDPATH= cd -- "$SPEEDCHAT_BASE_DIR" && pwd)  # a relative one is relative to where you ran this
cd "$(dirname "$0")"
REPO=$PWD

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
    trap 'echo; echo "interrupted: run \`bash speedrun.sh\` again to resume" >&2; exit 130' INT
    trap 'exit 143' TERM HUP
    if command -v setsid >/dev/null 2>&1; then
        env -u SPEEDRUN_ID setsid bash -c "while kill -0 $$ 2>/dev/null; do sleep 2; done; $(declare -f kill_run); kill_run $SPEEDRUN_ID" \
            </dev/null >/dev/null 2>&1 &
    fi
fi
# stages run in a session of their own (when setsid exists): Ctrl-C reaches this script alone, whose
# trap then stops the stage at once, instead of every process printing its traceback
SESSION=$(command -v setsid >/dev/null 2>&1 && echo setsid || true)

# --- environment: Rust (installed when missing and the network allows), uv, .venv, rustbpe
if [ "${SPEEDCHAT_SKIP_SETUP:-}" != 1 ]; then
    if ! command -v cargo >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo" ] && command -v curl >/dev/null 2>&1; then
        echo "Rust is missing: installing it with rustup"
        curl --proto '=https' --tlsv1.2 -sSf --max-time 120 https://sh.rustup.rs | sh -s -- -y --profile minimal >/dev/null \
            || { echo "error: could not install Rust: install it from https://rustup.rs and re-run" >&2; exit 1; }
    fi
    SETUP_START=$SECONDS
    source ./setup_env.sh
    echo "environment ready in $((SECONDS - SETUP_START))s"
fi
[ -x .venv/bin/python ] || { echo "error: no .venv here: run without SPEEDCHAT_SKIP_SETUP to create it" >&2; exit 1; }
PY=.venv/bin/python

NGPU=$($PY -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if [ "$NGPU" = 0 ] && [ -z "${SPEEDCHAT_PRESET:-}" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
    DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
    CUDA=$($PY -c 'import torch; print(torch.version.cuda)')
    echo "error: nvidia-smi sees GPUs but torch (built for CUDA $CUDA) cannot use them: driver $DRIVER is probably too old." \
         "Update the driver, or install a torch build for your CUDA (e.g. uv pip install torch --index-url https://download.pytorch.org/whl/cu128)." \
         "SPEEDCHAT_PRESET=cpu runs the CPU preset anyway." >&2
    exit 1
fi
NGPU=$(( ${SPEEDCHAT_NGPU:-$NGPU} < NGPU ? ${SPEEDCHAT_NGPU:-$NGPU} : NGPU ))
PRESET=${SPEEDCHAT_PRESET:-$([ "$NGPU" -gt 0 ] && echo gpu || echo cpu)}
case "$PRESET" in
    gpu) [ "$NGPU" -gt 0 ] || { echo "error: SPEEDCHAT_PRESET=gpu but torch sees no CUDA GPU: unset it to run the CPU preset" >&2; exit 1; } ;;
    cpu|cpu-learn) NGPU=0 ;;
    *) echo "error: SPEEDCHAT_PRESET must be gpu, cpu or cpu-learn, not '$PRESET'" >&2; exit 1 ;;
esac
# one thread a process (a GPU node runs one per GPU; the CPU preset shares its cores with tests);
# cpu-learn trains in one process, which torch gives every core when OMP_NUM_THREADS is unset
[ "$PRESET" = cpu-learn ] || export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DONE="$SPEEDCHAT_BASE_DIR/speedrun"
mkdir -p "$DONE"
[ -f "$DONE/run_id" ] || date +%Y%m%d-%H%M%S > "$DONE/run_id"
export SPEEDCHAT_RUN_ID=$(cat "$DONE/run_id")  # every report section of this run carries it
echo "speedrun: preset $PRESET, $NGPU GPU(s), artifacts in $SPEEDCHAT_BASE_DIR"

# stage NAME [--resumes CKPT] CMD...: run CMD unless NAME already finished with this very command.
# The marker $DONE/NAME holds the command it finished; $DONE/NAME.started the one it started. A
# training stage (--resumes: its checkpoint folder) that started this command and did not finish
# goes on from its last checkpoint. A stage that runs afresh, or a training that resumes, makes every
# later stage run again (except evaluations, which change no model). SPEEDCHAT_RERUN names stages
# that run afresh whatever their markers say.
FRESH=""
stage() {
    local name=$1 ckpt="" extra=()
    shift
    if [ "$1" = --resumes ]; then ckpt=$2; shift 2; fi
    local cmd="$*" forced=$FRESH
    [[ ",${SPEEDCHAT_RERUN:-}," == *",$name,"* ]] && forced=1
    if [ -z "$forced" ] && [ "$(cat "$DONE/$name" 2>/dev/null)" = "$cmd" ]; then
        echo "== $name: done in an earlier run, skipped"; return 0
    fi
    if [ -z "$forced" ] && [ -n "$ckpt" ] && [ "$(cat "$DONE/$name.started" 2>/dev/null)" = "$cmd" ] \
        && compgen -G "$SPEEDCHAT_BASE_DIR/checkpoints/$ckpt/*/meta_*.json" >/dev/null; then
        extra=(--resume); echo "== $name: resuming from its last checkpoint"
    else
        echo "== $name"
    fi
    [[ $name == *eval* ]] || FRESH=1
    rm -f "$DONE/$name"; echo "$cmd" > "$DONE/$name.started"
    local t0=$SECONDS status=0
    $SESSION "$@" ${extra[@]+"${extra[@]}"} &  # waited for in the background, so that a signal reaches our traps at once
    wait $! || status=$?
    if [ $status != 0 ]; then
        echo "error: stage $name failed (exit $status): fix what it says above, then run \`bash speedrun.sh\` again" >&2
        exit $status
    fi
    echo "$cmd" > "$DONE/$name"
    echo "== $name: $((SECONDS - t0))s"
}
# torchrun on GPUs; the CPU presets' one process runs without the launcher (a second torch import per stage)
RUN=$([ "$NGPU" -gt 0 ] && echo "$PY -m torch.distributed.run --standalone --nproc_per_node=$NGPU" || echo "$PY")

stage report-reset $PY -m report reset --preset "$PRESET"

if [ "$PRESET" = gpu ]; then
    # d24 on 8 tokens per scaling parameter: the GPT-2-grade run (SPEEDCHAT_DEPTH=20: the cheap tier).
    # The plan (plan.py) sizes it for these GPUs first: shards to download, rows per GPU, memory, disk.
    DEPTH=${SPEEDCHAT_DEPTH:-24}; SOURCE=${SPEEDCHAT_SOURCE:-climbmix}
    PLAN="$SPEEDCHAT_BASE_DIR/plan-d$DEPTH.json"
    plan_value() { $PY -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$PLAN" "$1"; }
    # the shard and disk check is for the sources it downloads; your own text needs the memory check only
    case $SOURCE in climbmix|fineweb-edu) CHECK="--source $SOURCE --check" ;; *) CHECK="" ;; esac
    { $PY -m plan --depth "$DEPTH" --ratio 8 --gpus "$NGPU" $CHECK --json > "$PLAN" && [ "$(plan_value fits)" = True ]; } \
        || { echo "error: d$DEPTH does not fit this machine (see the plan above): free disk, use GPUs with more memory, or SPEEDCHAT_DEPTH=20" >&2; exit 1; }
    SHARDS=${SPEEDCHAT_SHARDS:-$(plan_value shards_needed)}; DEVICE_BATCH=$(plan_value device_batch_size)
    FP8=$($PY -c 'import torch, fp8; print("--fp8" if fp8.fp8_supported(torch.device("cuda"))[0] else "")')
    stage data $PY -m dataset --source "$SOURCE" -n $(( SHARDS < 8 ? SHARDS : 8 ))
    $PY -m dataset --source "$SOURCE" -n "$SHARDS" > "$SPEEDCHAT_BASE_DIR/download.log" 2>&1 &
    DOWNLOAD_PID=$!
    stage tokenizer-train $PY -m tokenizer.train --source "$SOURCE" --vocab-size 32768 --max-chars 2000000000 --force
    stage tokenizer-eval $PY -m tokenizer.eval --source "$SOURCE"
    echo "waiting for the shard download (log: $SPEEDCHAT_BASE_DIR/download.log)"
    wait $DOWNLOAD_PID || { echo "error: the shard download failed: see $SPEEDCHAT_BASE_DIR/download.log" >&2; exit 1; }
    # The batch sizes of nanochat's d20 recipe, rounded up so that any number of GPUs divides them.
    round_up() { echo $(( ($1 + $2 - 1) / $2 * $2 )); }
    TOKENS_PER_STEP=$(round_up 524288 $((DEVICE_BATCH * 2048 * NGPU)))   # the plan's rows of 2048 tokens per GPU
    SFT_EXAMPLES=$(round_up 32 $((4 * NGPU)))                  # 4 conversations per GPU
    stage base-train --resumes base $RUN -m base_train --depth "$DEPTH" --source "$SOURCE" --target-param-data-ratio 8 \
        --device-batch-size "$DEVICE_BATCH" $FP8
    stage base-eval $RUN -m base_eval
    stage mid-train --resumes mid $RUN -m mid_train --preset full --device-batch-size "$DEVICE_BATCH" \
        --total-batch-size $TOKENS_PER_STEP
    stage chat-eval-mid $RUN -m chat_eval --source mid
    stage chat-sft --resumes sft $RUN -m chat_sft --preset full --examples-per-step $SFT_EXAMPLES
    stage chat-eval-sft $RUN -m chat_eval --source sft
    # RL: one pass over GSM8K train, 16 problems (rounded up to the GPUs) x 16 answers per step: ~470 steps
    RL_FLAGS="--preset full --examples-per-step $(round_up 16 $NGPU)" RL_EVAL="--task-name GSM8K"
else
    # cpu: offline, minutes on 2 cores: the stdlib-docs corpus, a 2-layer model, self-generated chat tasks.
    # cpu-learn: a d4 model (11.5M parameters), 400 steps of 4,096 tokens from 4 real shards, then the same chat
    # stages; the report shows its greedy completions of fixed prompts ("The capital of France is"). Its base
    # training costs ~3.2 CPU-seconds a step on one core (~22 min for the 400; it gets every core). 120 of the
    # steps on Project Gutenberg learned English phrases, no facts (bench/RESULTS.md, "cpu-learn preset").
    if [ "$PRESET" = cpu ]; then
        DEPTH=${SPEEDCHAT_DEPTH:-2}; SOURCE=${SPEEDCHAT_SOURCE:-stdlib-docs}; VOCAB=2048; CHARS=20000000; T=128
        TRAIN="--aspect-ratio 64 --head-dim 32 --device-batch-size 8 --total-batch-size 1024 --num-iterations 300 --sample-every 150"
    else
        DEPTH=${SPEEDCHAT_DEPTH:-4}; SOURCE=${SPEEDCHAT_SOURCE:-fineweb-edu}; VOCAB=8192; CHARS=50000000; T=256
        TRAIN="--device-batch-size 16 --total-batch-size 4096 --num-iterations 400 --sample-every 100"
    fi
    if [ ! -f "$DONE/data" ] && [[ $SOURCE == fineweb-edu && -z ${SPEEDCHAT_FINEWEB_URL:-} ]] \
        && ! $PY -c "import socket; socket.create_connection(('huggingface.co', 443), timeout=10)" 2>/dev/null; then
        echo "error: $PRESET downloads FineWeb-edu shards and huggingface.co is out of reach: set SPEEDCHAT_SOURCE=dir:PATH" \
             "(a folder of .txt/.md/.jsonl/.parquet text) or run SPEEDCHAT_PRESET=cpu" >&2
        exit 1
    fi
    stage data $PY -m dataset --source "$SOURCE" -n "${SPEEDCHAT_SHARDS:-4}"
    stage tokenizer-train $PY -m tokenizer.train --source "$SOURCE" --vocab-size $VOCAB --max-chars $CHARS --force
    stage tokenizer-eval $PY -m tokenizer.eval --source "$SOURCE"
    stage base-train --resumes base $RUN -m base_train --depth "$DEPTH" --source "$SOURCE" --max-seq-len $T $TRAIN \
        --eval-every 100 --eval-tokens 32768 --save-every 100
    stage base-eval $RUN -m base_eval --eval bpb,sample --split-tokens 32768
    stage mid-train --resumes mid $RUN -m mid_train --preset offline --max-seq-len $T --device-batch-size 8 \
        --num-iterations 150 --eval-every 25 --eval-tokens 16384
    stage chat-eval-mid $RUN -m chat_eval --source mid --max-problems 50
    stage chat-sft --resumes sft $RUN -m chat_sft --preset offline --device-batch-size 8 --num-iterations 100 \
        --eval-every 20 --eval-examples 256
    stage chat-eval-sft $RUN -m chat_eval --source sft --max-problems 50
    # RL on arithmetic, briefly; the tiny model needs a larger fraction of the lr (0.5 collapses it)
    RL_FLAGS="--preset offline --num-iterations 20 --examples-per-step 8 --num-samples 8 --max-new-tokens 64
              --eval-problems 32 --device-batch-size 32 --init-lr-frac 0.2" RL_EVAL="--max-problems 50"
fi
if [ "${SPEEDCHAT_SKIP_RL:-0}" != 1 ]; then
    stage chat-rl --resumes rl $RUN -m chat_rl $RL_FLAGS
    stage chat-eval-rl $RUN -m chat_eval --source rl $RL_EVAL
fi

$PY -m report generate --out-dir "$CALLER_DIR"
# what to type next, in any new shell (no uv needed: the environment is the .venv folder)
BASE_VAR=$([ "$SPEEDCHAT_BASE_DIR" = "$HOME/.cache/speedchat" ] || echo "export SPEEDCHAT_BASE_DIR=$SPEEDCHAT_BASE_DIR && ")
echo "done: read $CALLER_DIR/report.md, then chat with your model (python -m chat_web for the browser):"
echo "  cd $REPO && source .venv/bin/activate && ${BASE_VAR}python -m chat_cli"

#!/usr/bin/env bash
# The GPU check: every stage of the pipeline at reduced scale on ONE GPU under torchrun, on local
# data (no network), then the GPU benchmarks. Each part is one argument, so that the parts can be
# run in separate calls when a machine is lent for a limited time:
#
#   bash bench/gpu_check.sh DATA OUT [tests] [pipeline] [train] [fp8] [infer]     (default: all five)
#
#   DATA  a folder laid out like ../shared/data: gutenberg/ (parquet shards; the last one is the
#         validation split), core_eval_bundle/, gsm8k/train.jsonl, mmlu/, humaneval/, words/, chat/
#   OUT   where each part writes its log (<part>.log) and the pipeline its report.md
#
#   tests     the tests marked gpu (CUDA graphs, fp8 and CUDA-only dataloader checks)
#   pipeline  tokenizer -> base_train (d12, 150 steps) -> base_eval (CORE on the local bundle, bpb)
#             -> mid_train -> chat_eval -> chat_sft -> chat_eval -> chat_rl -> chat_eval -> chat_cli -> report.md
#   train     bench.train_bench at depth 20 (compiled and eager) and depth 26 (compiled)
#   fp8       bench.train_bench --fp8 at depth 20, and base_train d12 for 150 steps with and
#             without --fp8 on the same data: the validation bpb of both
#   infer     bench.infer_bench at depth 20, batch 1 and 32
#
# PYTHON (default python3) must have torch and the project's dependencies, rustbpe included (a
# wheel built with `maturin build --release -m rustbpe/Cargo.toml`). SCALE=tiny shrinks every size
# so that the script itself can be checked on a CPU in a few minutes.
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,22p' "$0"; exit 2; }
DATA=$(cd "$1" && pwd)
mkdir -p "$2"
OUT=$(cd "$2" && pwd)
shift 2
PARTS=${*:-tests pipeline train fp8 infer}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RUN="$PY -m torch.distributed.run --standalone --nproc_per_node=1"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export SPEEDCHAT_BASE_DIR=${SPEEDCHAT_BASE_DIR:-$(mktemp -d /tmp/speedchat_gpu_check.XXXX)}
for needed in gutenberg core_eval_bundle gsm8k/train.jsonl mmlu/dev mmlu/val humaneval words chat/dummy_conversation.json; do
    [ -e "$DATA/$needed" ] || { echo "error: $DATA/$needed is missing (see the top of $0)" >&2; exit 1; }
done
# The local MMLU has only dev and val CSVs: stand them in for the train split (auxiliary_train/) and
# the test split. GSM8K's local copy is its train split only, so chat_eval's GSM8K score here is on
# training problems. Both make the chat stages run on real formats: a smoke check, not a result.
MMLU=$SPEEDCHAT_BASE_DIR/mmlu_stand_in
mkdir -p "$MMLU/auxiliary_train" "$MMLU/test"
cp "$DATA"/mmlu/dev/*.csv "$MMLU/auxiliary_train/" && cp "$DATA"/mmlu/val/*.csv "$MMLU/test/"
CHAT_DATA="--gsm8k-path $DATA/gsm8k/train.jsonl --humaneval-path $(ls "$DATA"/humaneval/*.jsonl | head -1)
           --words-path $(ls "$DATA"/words/* | head -1) --mmlu-path $MMLU
           --smoltalk-path $DATA/chat/dummy_conversation.json"
TASKS="MMLU,GSM8K,HumanEval,SpellingBee,Arithmetic"  # ARC has no local copy (it would need a download)

if [ "${SCALE:-}" = tiny ]; then
    VOCAB=4096 CHARS=5000000 TRAIN_BENCH="--head-dim 32 --vocab-size 4096 --seq-len 128 --device-batch-size 4 --steps 3 --warmup 1"
    BASE="--depth 2 --head-dim 32 --max-seq-len 256 --device-batch-size 8 --total-batch-size 2048 --num-iterations 30
          --eval-every 15 --eval-tokens 8192 --sample-every -1 --save-every 15"
    CHAT="--max-seq-len 256 --device-batch-size 8 --num-iterations 10" MID=""
    EVAL="--max-problems 8 --max-new-tokens 32" CORE="--max-per-task 8 --split-tokens 8192"
    RL="--num-iterations 4 --examples-per-step 2 --num-samples 4 --max-new-tokens 32 --eval-problems 8 --eval-samples 2"
    INFER="--depth 2 --head-dim 32 --vocab-size 4096 --prompt-len 64 --gen-len 16 --batch-sizes 1,4 --repeats 1"
    DEPTHS="2 3"
else
    VOCAB=32768 CHARS=60000000 TRAIN_BENCH=""
    # sized so that each part takes well under 10 minutes on one H100 (d12: ~0.8 GFLOP/token)
    BASE="--depth 12 --device-batch-size 32 --total-batch-size 131072 --num-iterations 150 --eval-every 50
          --eval-tokens 262144 --sample-every 150 --save-every 75"
    CHAT="--device-batch-size 16 --num-iterations 60" MID="--total-batch-size 131072"
    EVAL="--max-problems 50 --max-new-tokens 128" CORE="--max-per-task 100 --split-tokens 262144"
    RL="--num-iterations 20 --examples-per-step 16 --num-samples 8 --max-new-tokens 128 --eval-problems 64 --eval-every 10"
    INFER="--device cuda --batch-sizes 1,32"
    DEPTHS="20 26"
fi
SOURCE="--source dir:$DATA/gutenberg"

part() {  # part NAME CMD...: run CMD with its output in $OUT/NAME.log and on the terminal
    local name=$1; shift
    echo "== $name (log: $OUT/$name.log)"
    local t0=$SECONDS
    set +e  # a failed part is reported and the others still run; inside it, the first error stops it
    ( set -e; "$@" ) 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    set -e
    if [ "$rc" = 0 ]; then
        echo "== $name: $((SECONDS - t0))s"
    else
        echo "== $name: FAILED (exit $rc) after $((SECONDS - t0))s"
        FAILED="$FAILED $name"
    fi
}
FAILED="" 

tokenizer() {  # the pipeline's tokenizer, trained once per SPEEDCHAT_BASE_DIR
    [ -f "$SPEEDCHAT_BASE_DIR/tokenizer/tokenizer.json" ] || $PY -m tokenizer.train $SOURCE --vocab-size $VOCAB --max-chars $CHARS
}

pipeline() {
    set -x
    tokenizer
    $PY -m tokenizer.eval $SOURCE
    $RUN -m base_train -- $BASE $SOURCE
    $RUN -m base_eval -- --bundle "$DATA/core_eval_bundle" $CORE
    $RUN -m mid_train -- --preset full $CHAT $MID $CHAT_DATA
    $RUN -m chat_eval -- --source mid --preset full --task-name $TASKS $EVAL $CHAT_DATA
    $RUN -m chat_sft -- --preset offline $CHAT $CHAT_DATA  # full needs ARC, which has no local copy
    $RUN -m chat_eval -- --source sft --preset full --task-name $TASKS $EVAL $CHAT_DATA
    $RUN -m chat_rl -- --preset full $RL $CHAT_DATA  # held out: the first --eval-problems of the local GSM8K
    $RUN -m chat_eval -- --source rl --preset full --task-name GSM8K $EVAL $CHAT_DATA
    $PY -m chat_cli --prompt "What is 12 * 7? Use the calculator." --max-tokens 64
    $PY -m report generate --out-dir "$OUT"
    set +x
}

train() {
    local first=${DEPTHS%% *} second=${DEPTHS##* }
    $PY -m bench.train_bench --depth $first $TRAIN_BENCH  # with the eager peer: what compile buys
    $PY -m bench.train_bench --depth $second $TRAIN_BENCH --no-eager --device-batch-size 16  # d26: 32 rows may not fit
}

fp8() {
    local depth=${DEPTHS%% *}
    $PY -m bench.train_bench --depth $depth $TRAIN_BENCH --no-eager --fp8
    tokenizer
    $RUN -m base_train -- $BASE $SOURCE --model-tag fp8-off
    $RUN -m base_train -- $BASE $SOURCE --model-tag fp8-on --fp8
}

for p in $PARTS; do
    case $p in
        tests) part tests $PY -m pytest -q -m gpu $(grep -l 'mark.gpu' tests/test_*.py) ;;
        pipeline) part pipeline pipeline ;;
        train) part train train ;;
        fp8) part fp8 fp8 ;;
        infer) part infer $PY -m bench.infer_bench $INFER ;;
        *) echo "error: unknown part '$p': use tests, pipeline, train, fp8, infer" >&2; exit 2 ;;
    esac
done
[ -z "$FAILED" ] || { echo "failed parts:$FAILED" >&2; exit 1; }

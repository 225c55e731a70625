#!/usr/bin/env bash
# One LongPO round on the embedded SmolLM2-135M-Instruct (8K native context) to CTX tokens with
# data it generates itself, and the baselines on the same data (SFT on the chosen answers; plain
# DPO whose reference sees the long context), then the long-context evaluation of all four.
# Issue #9's run; docs/evaluation.md. Every step skips itself when its output exists (rerun to resume).
#
#   bash examples/longpo_smollm2/run.sh                  # GPU defaults: 64 documents, 16K tokens
#   TINY=1 bash examples/longpo_smollm2/run.sh           # a few minutes on the CPU: the script itself
#
# Knobs (environment): W (work dir), CTX, DOCS, WORDS, CHUNK, ROPE, LR, GBS, EVAL_LENGTHS, EVAL_SAMPLES,
# NGPU (DP ranks; CP is left at 1: docs/logprobs.md), METHODS.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ "${TINY:-0}" = 1 ]; then
  : "${W:=runs/longpo_smollm2_tiny}" "${CTX:=2048}" "${DOCS:=2}" "${WORDS:=800}" "${CHUNK:=320}" "${GEN_TOKENS:=24}"
  : "${EVAL_LENGTHS:=512 1024}" "${EVAL_SAMPLES:=1}" "${EVAL_TASKS:=niah_single vt}"
  : "${GBS:=2}" "${NGPU:=1}" "${GEN_EXTRA:=--device cpu --dtype float32 --threads 2}"
fi
: "${W:=runs/longpo_smollm2}" "${CTX:=16384}" "${DOCS:=64}" "${WORDS:=11000}" "${CHUNK:=3000}" "${GEN_TOKENS:=256}"
: "${ROPE:=1000000}" "${LR:=1e-5}" "${GBS:=8}" "${EVAL_LENGTHS:=4096 8192 16384 32768}" "${EVAL_SAMPLES:=10}"
: "${EVAL_TASKS:=}" "${EVAL_EXTRA:=}" "${GEN_EXTRA:=--dtype bfloat16 --batch-size 16}" "${METHODS:=longpo sft dpo}"
: "${NGPU:=$(nvidia-smi -L 2>/dev/null | wc -l | awk '{print ($1 > 0) ? $1 : 1}')}"
mkdir -p "$W"
log() { echo "== $(date +%H:%M:%S) $*"; }
trun() { torchrun --nproc-per-node "$NGPU" --master-port=$((20000 + RANDOM % 20000)) "$@"; }

HF=$($PY -c "from megatron_longpo.models.embedded import materialize_default_model as m; print(m())")
[ -f "$W/base/latest" ] || { log "import SmolLM2"; $PY tools/convert_checkpoint.py hf-to-megatron --hf-dir "$HF" --out "$W/base"; }

[ -f "$W/docs.jsonl" ] || { log "documents"; $PY tools/make_long_documents.py --n "$DOCS" --words "$WORDS" --seed 0 --out "$W/docs.jsonl"; }

# the generator's length budget counts the chat template approximately: keep a margin under CTX
log "self-generated LongPO pairs (SmolLM2: questions and chosen answers on ${CHUNK}-token chunks, rejected on the document)"
$PY tools/build_longpo_pairs.py "$W/docs.jsonl" -o "$W/pairs.jsonl" --backend transformers --model "$HF" \
  --chunk-tokens "$CHUNK" --max-chunks 4 --questions-per-chunk 1 --max-pair-tokens $((CTX - CTX / 32)) --max-new-tokens "$GEN_TOKENS" \
  --question-max-new-tokens 128 --no-progress $GEN_EXTRA || [ $? = 3 ]

[ -f "$W/data.json" ] || { log "preprocess"; $PY tools/preprocess_pairs.py --input "$W/pairs.jsonl" --kind longpo \
  --tokenizer "$HF" --output "$W/data" --max-length "$CTX" --no-progress; }
[ -f "$W/data.ref.safetensors" ] || { log "reference on the short contexts (LongPO)"; trun tools/precompute_ref_logps.py --data "$W/data" --model "$W/base"; }
[ -f "$W/data.longref.safetensors" ] || { log "reference on the long contexts (plain DPO)"
  trun tools/precompute_ref_logps.py --data "$W/data" --model "$W/base" --reference-sees-policy --out "$W/data.longref.safetensors"; }

for m in $METHODS; do
  extra=""
  [ "$m" = dpo ] && extra="data.reference=$W/data.longref.safetensors"
  if [ ! -f "$W/$m/summary.json" ]; then
    log "train $m"
    trun -m megatron_longpo.train --config examples/longpo_smollm2/train.yaml model.checkpoint="$W/base" \
      data.path="$W/data" data.global_batch_size="$GBS" loss.name="$m" model.rope_theta="$ROPE" optim.lr="$LR" \
      model.max_position_embeddings="$CTX" train.save_dir="$W/$m" $extra
  fi
  [ -f "$W/hf_$m/config.json" ] || $PY tools/convert_checkpoint.py megatron-to-hf --megatron-dir "$W/$m" --out "$W/hf_$m"
done

# base_rope: the base model with the enlarged RoPE base and no training (what the base change alone does)
table=()
for m in base base_rope $METHODS; do
  dir=$(case $m in base|base_rope) echo "$HF";; *) echo "$W/hf_$m";; esac)
  rope=$([ "$m" = base_rope ] && echo "--rope-theta $ROPE" || echo "")
  if [ ! -f "$W/eval_$m.json" ]; then
    log "evaluate $m"
    $PY tools/eval_long.py --model "$dir" $rope --lengths $EVAL_LENGTHS ${EVAL_TASKS:+--tasks $EVAL_TASKS} \
      --samples "$EVAL_SAMPLES" --seed 0 --retention --no-progress --out "$W/eval_$m.json" $EVAL_EXTRA || [ $? = 3 ]
  fi
  table+=("$m=$W/eval_$m.json")
done
log "table"
$PY tools/eval_long.py --table "${table[@]}" | tee "$W/table.md"

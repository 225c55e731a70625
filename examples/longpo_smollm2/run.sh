#!/usr/bin/env bash
# One LongPO round on the embedded SmolLM2-135M-Instruct (8K native context) to CTX tokens with
# data it generates itself, and the baselines on the same data, then the long-context evaluation of
# all of them. Issues #9 and #20; docs/evaluation.md. Every step skips itself when its output exists
# (rerun to resume).
#
#   bash examples/longpo_smollm2/run.sh                  # GPU defaults: 1,024 documents (~15K tokens), 16K context
#   CONTINUE=1 DOCS=1536 bash examples/longpo_smollm2/run.sh  # unpack the committed pairs, then generate on
#   TINY=1 bash examples/longpo_smollm2/run.sh           # a few minutes on the CPU: the script itself
#
# The pairs: when COMPACT (default examples/longpo_smollm2/pairs.compact.jsonl.gz, the committed
# pairs of a GPU run) exists and W has no pairs.jsonl, they are unpacked from it (tools/pack_pairs.py:
# identical records, the documents rebuilt) instead of generated; GENERATE=1 (in a fresh W) generates them.
# A generation writes W/pairs.compact.jsonl.gz beside them (copy it to COMPACT to keep it).
#
# METHODS (default all five, each a model trained from the base on the same documents):
#   longpo       LongPO, the paper's loss: NLL over the whole chosen long sequence + λ·DPO (loss.longpo_nll=sequence)
#   longpo_resp  the ablation: the NLL over the chosen responses only (loss.longpo_nll=responses)
#   sft          SFT on the chosen answers, given the long document
#   dpo          plain DPO on the long context (its reference sees the long context too)
#   docnll       control: next-token NLL on the documents alone, no questions or answers
#                (tools/document_nll_data.py + loss.name=sft: what continued training on the same
#                documents recovers)
#
# Knobs (environment): W (work dir), CTX, DOCS, WORDS, CHUNK, ROPE, LR, GBS, EPOCHS, EVAL_LENGTHS,
# EVAL_SAMPLES (per task and length; default: enough for EVAL_MIN_SAMPLES=50 per model and length over
# the EVAL_TASKS), NGPU (DP ranks; CP is left at 1: docs/logprobs.md), EVAL_PER_GPU (evaluations side by
# side on one GPU), METHODS, COMPACT, GENERATE, DEADLINE (epoch seconds: no stage starts when less than
# its usual time is left and the generation is interrupted at it; rerun to resume).
# With several GPUs the generation and the evaluations run one shard / one model per GPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ "${TINY:-0}" = 1 ]; then
  : "${W:=runs/longpo_smollm2_tiny}" "${CTX:=2048}" "${DOCS:=2}" "${WORDS:=800}" "${CHUNK:=320}" "${GEN_TOKENS:=24}"
  : "${EVAL_LENGTHS:=512 1024}" "${EVAL_SAMPLES:=1}" "${EVAL_TASKS:=niah_single vt}"
  : "${GBS:=1}" "${EPOCHS:=1}" "${NGPU:=1}" "${GEN_EXTRA:=--device cpu --dtype float32 --threads 2}" "${COMPACT:=}"
fi
: "${W:=runs/longpo_smollm2}" "${CTX:=16384}" "${DOCS:=1024}" "${WORDS:=9300}" "${CHUNK:=3000}" "${GEN_TOKENS:=256}"
: "${ROPE:=1000000}" "${LR:=1e-5}" "${GBS:=4}" "${EPOCHS:=1}" "${EVAL_LENGTHS:=4096 8192 16384}"
: "${EVAL_TASKS:=}" "${EVAL_EXTRA:=--batch-size 16}" "${GEN_EXTRA:=--dtype bfloat16 --batch-size 128 --docs-per-batch 64}"
: "${METHODS:=longpo longpo_resp sft dpo docnll}" "${COMPACT=examples/longpo_smollm2/pairs.compact.jsonl.gz}"
for m in $METHODS; do
  case $m in longpo|longpo_resp|sft|dpo|docnll) ;; *) echo "error: unknown method $m in METHODS (longpo longpo_resp sft dpo docnll)" >&2; exit 2;; esac
done
if [ -z "${EVAL_SAMPLES:-}" ]; then  # the standard error of a (model, length) average wants >= 50 samples
  ntasks=$(if [ -n "$EVAL_TASKS" ]; then echo $EVAL_TASKS | wc -w; else $PY -c "from megatron_longpo.eval.ruler import DEFAULT_TASKS as t; print(len(t))"; fi)
  EVAL_SAMPLES=$(( (${EVAL_MIN_SAMPLES:-50} + ntasks - 1) / ntasks ))
fi
: "${NGPU:=$(nvidia-smi -L 2>/dev/null | wc -l | awk '{print ($1 > 0) ? $1 : 1}')}"
mkdir -p "$W"
log() { echo "== $(date +%H:%M:%S) $*"; }
before() {  # before NAME SECONDS: stop here (status 0) when fewer than SECONDS are left before DEADLINE
  [ -z "${DEADLINE:-}" ] || [ $((DEADLINE - $(date +%s))) -ge "$2" ] || { log "deadline: stopping before $1; rerun to resume"; wait; exit 0; }
}
if nvidia-smi -L >/dev/null 2>&1; then slots=$NGPU eval_slots=$((NGPU * ${EVAL_PER_GPU:-1})); else slots=1 eval_slots=1; fi
trun() { $PY -m torch.distributed.run --nproc-per-node "$NGPU" --master-port=$((20000 + RANDOM % 20000)) "$@"; }

HF=$($PY -c "from megatron_longpo.models.embedded import materialize_default_model as m; print(m())")
[ -f "$W/base/latest" ] || { log "import SmolLM2"; $PY tools/convert_checkpoint.py hf-to-megatron --hf-dir "$HF" --out "$W/base"; }

if [ ! -f "$W/data.json" ] && [ ! -f "$W/pairs.jsonl" ] && [ "${GENERATE:-0}" != 1 ] && [ -n "$COMPACT" ] && [ -f "$COMPACT" ]; then
  log "pairs unpacked from $COMPACT (GENERATE=1 generates them instead)"
  # CONTINUE=1: generate on over DOCS documents (more than the compact header's n to reach new ones),
  # written below; the documents tried before and dropped are not recorded in the compact form: they
  # are tried again
  if [ "${CONTINUE:-0}" = 1 ]; then
    $PY tools/pack_pairs.py unpack "$COMPACT" -o "$W/pairs.jsonl"
  else
    $PY tools/pack_pairs.py unpack "$COMPACT" -o "$W/pairs.jsonl" --docs-out "$W/docs.jsonl" && touch "$W/pairs.unpacked"
  fi
fi
[ -f "$W/docs.jsonl" ] || { log "documents"; $PY tools/make_long_documents.py --n "$DOCS" --words "$WORDS" --seed 0 --out "$W/docs.jsonl"; }

# the generator's length budget counts the chat template approximately: keep a margin under CTX
generate() {  # generate DOCS PAIRS [GPU]: resumes; status 0, 3 (some documents failed), 124/130 (stopped at DEADLINE)
  local left=0
  [ -z "${DEADLINE:-}" ] || left=$((DEADLINE - $(date +%s)))
  env ${3:+CUDA_VISIBLE_DEVICES=$3} timeout -s INT "$left" $PY tools/build_longpo_pairs.py "$1" -o "$2" --backend transformers \
    --model "$HF" --chunk-tokens "$CHUNK" --max-chunks 4 --questions-per-chunk 1 --max-pair-tokens $((CTX - CTX / 32)) \
    --max-new-tokens "$GEN_TOKENS" --question-max-new-tokens 128 --no-progress $GEN_EXTRA
}
if [ ! -f "$W/data.json" ] && [ ! -f "$W/pairs.unpacked" ]; then
  before generation 60
  log "self-generated LongPO pairs (SmolLM2: questions and chosen answers on ${CHUNK}-token chunks, rejected on the document)"
  rc=0
  if [ "$slots" = 1 ]; then
    generate "$W/docs.jsonl" "$W/pairs.jsonl" || rc=$?
  else  # one shard of the documents per GPU, concatenated in shard order
    awk -v n="$slots" -v w="$W" '{ print > (w "/docs.s" (NR - 1) % n ".jsonl") }' "$W/docs.jsonl"
    pids=()
    for ((g = 0; g < slots; g++)); do generate "$W/docs.s$g.jsonl" "$W/pairs.s$g.jsonl" $g > "$W/generate.s$g.log" 2>&1 & pids+=($!); done
    for p in "${pids[@]}"; do wait "$p" || { r=$?; [ $rc = 124 ] || rc=$r; }; done
    tail -n 12 "$W"/generate.s*.log
    for ((g = 0; g < slots; g++)); do cat "$W/pairs.s$g.jsonl"; done > "$W/pairs.jsonl.tmp" && mv "$W/pairs.jsonl.tmp" "$W/pairs.jsonl"
  fi
  { [ $rc = 124 ] || [ $rc = 130 ]; } && { log "deadline: generation stopped; rerun to resume"; exit 0; }
  [ $rc = 0 ] || [ $rc = 3 ] || { echo "error: generation failed (status $rc)" >&2; exit $rc; }
  log "packing the pairs (commit $W/pairs.compact.jsonl.gz as ${COMPACT:-examples/longpo_smollm2/pairs.compact.jsonl.gz} to keep them)"
  $PY tools/pack_pairs.py pack "$W/pairs.jsonl" -o "$W/pairs.compact.jsonl.gz" --docs-n "$DOCS" --docs-words "$WORDS" \
    --docs-seed 0 --setting "generator=$(basename "$HF")" --setting "chunk_tokens=$CHUNK" --setting "max_chunks=4" \
    --setting "questions_per_chunk=1" --setting "max_pair_tokens=$((CTX - CTX / 32))" \
    --setting "max_new_tokens=$GEN_TOKENS" --setting "question_max_new_tokens=128" --setting "extra=$GEN_EXTRA" \
    --setting "status=$rc"
fi

before preprocessing 90
[ -f "$W/data.json" ] || { log "preprocess"; $PY tools/preprocess_pairs.py --input "$W/pairs.jsonl" --kind longpo \
  --tokenizer "$HF" --output "$W/data" --max-length "$CTX" --no-progress; }
[ -f "$W/data.ref.safetensors" ] || { log "reference on the short contexts (LongPO)"; trun tools/precompute_ref_logps.py --data "$W/data" --model "$W/base"; }
[ -f "$W/data.longref.safetensors" ] || { log "reference on the long contexts (plain DPO)"
  trun tools/precompute_ref_logps.py --data "$W/data" --model "$W/base" --reference-sees-policy --out "$W/data.longref.safetensors"; }
if [[ " $METHODS " == *" docnll "* ]] && [ ! -f "$W/docnll_data.json" ]; then  # the control's data: the same documents alone
  log "preprocess the document-NLL control"
  $PY tools/document_nll_data.py "$W/pairs.jsonl" -o "$W/docnll.jsonl"
  $PY tools/preprocess_pairs.py --input "$W/docnll.jsonl" --kind pair --tokenizer "$HF" --output "$W/docnll_data" \
    --max-length "$CTX" --no-progress
fi

for m in $METHODS; do
  data="$W/data"
  case $m in
    longpo) extra="loss.name=longpo loss.longpo_nll=sequence";;
    longpo_resp) extra="loss.name=longpo loss.longpo_nll=responses";;
    sft) extra="loss.name=sft";;
    dpo) extra="loss.name=dpo data.reference=$W/data.longref.safetensors";;
    docnll) extra="loss.name=sft" data="$W/docnll_data";;
  esac
  if [ ! -f "$W/$m/summary.json" ]; then
    before "training $m" "${TRAIN_SECONDS:-150}"
    log "train $m"
    trun -m megatron_longpo.train --config examples/longpo_smollm2/train.yaml model.checkpoint="$W/base" \
      data.path="$data" data.global_batch_size="$GBS" model.rope_theta="$ROPE" optim.lr="$LR" \
      model.max_position_embeddings="$CTX" train.epochs="$EPOCHS" train.save_dir="$W/$m" $extra
  fi
  [ -f "$W/hf_$m/config.json" ] || $PY tools/convert_checkpoint.py megatron-to-hf --megatron-dir "$W/$m" --out "$W/hf_$m"
done

# base_rope: the base model with the enlarged RoPE base and no training (what the base change alone does).
# With several GPUs the models are evaluated side by side, EVAL_PER_GPU per GPU (logs: $W/eval_NAME.log).
table=()
i=0
for m in base base_rope $METHODS; do
  dir=$(case $m in base|base_rope) echo "$HF";; *) echo "$W/hf_$m";; esac)
  rope=$([ "$m" = base_rope ] && echo "--rope-theta $ROPE" || echo "")
  table+=("$m=$W/eval_$m.json")
  [ -f "$W/eval_$m.json" ] && continue
  before "evaluating $m" "${EVAL_SECONDS:-200}"
  log "evaluate $m"
  gpu=$([ "$slots" -gt 1 ] && echo "CUDA_VISIBLE_DEVICES=$((i % slots))" || echo "")
  i=$((i + 1))
  ( env $gpu $PY tools/eval_long.py --model "$dir" $rope --lengths $EVAL_LENGTHS ${EVAL_TASKS:+--tasks $EVAL_TASKS} \
      --samples "$EVAL_SAMPLES" --seed 0 --retention --no-progress --out "$W/eval_$m.json" $EVAL_EXTRA > "$W/eval_$m.log" 2>&1 \
      || [ $? = 3 ] || { echo "evaluation of $m failed; the end of $W/eval_$m.log:"; tail -20 "$W/eval_$m.log"; } ) &
  while [ "$(jobs -rp | wc -l)" -ge "$eval_slots" ]; do wait -n || true; done
done
wait
for m in base base_rope $METHODS; do
  [ -f "$W/eval_$m.json" ] || { echo "error: no $W/eval_$m.json (see $W/eval_$m.log); rerun to retry" >&2; exit 1; }
done
log "table"
$PY tools/eval_long.py --table "${table[@]}" | tee "$W/table.md"

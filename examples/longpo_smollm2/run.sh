#!/usr/bin/env bash
# One LongPO round on the embedded SmolLM2-135M-Instruct (8K native context) to CTX tokens with
# data it generates itself, and the baselines on the same data, then the long-context evaluation of
# all of them (examples/longpo_smollm2/README.md; tools/experiment.py runs the same from experiment.yaml). Every step skips itself when its output exists
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
#   dpo          plain DPO on the long context (its reference, the base model, sees the long context too, at
#                its own RoPE base: past its window there)
#   dpo_policy   not in the default list: plain DPO whose reference is the initial policy (the base model at
#                the enlarged RoPE base ROPE) on the long context
#   docnll       control: next-token NLL on the documents alone, no questions or answers
#                (tools/document_nll_data.py + loss.name=sft: what continued training on the same
#                documents recovers)
#
# Knobs (environment): W (work dir), CTX, DOCS, WORDS, CHUNK, ROPE, LR, GBS, EPOCHS, EVAL_LENGTHS,
# EVAL_SAMPLES (per task and length; default: enough for EVAL_MIN_SAMPLES=50 per model and length over
# the EVAL_TASKS), NGPU (GPUs used; CP is left at 1: docs/logprobs.md), TRAIN_GPUS (GPUs per training,
# data parallel; default 1), JOBS_PER_GPU (with TRAIN_GPUS < NGPU: models trained/evaluated side by side
# on one GPU; default 1), METHODS, VARIANTS (methods trained with overrides: below), COMPACT, GENERATE,
# DEADLINE (epoch seconds: no stage starts when less than its usual time is left and the generation is
# interrupted at it; rerun to resume).
# With several GPUs the generation runs one shard per GPU, the references one per GPU, and each model
# is a job (train, export, evaluate) on its own GPU(s), NGPU / TRAIN_GPUS x JOBS_PER_GPU jobs at a time.
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
known_methods="longpo longpo_resp sft dpo dpo_policy docnll"
known_method() { [[ " $known_methods " == *" $1 "* ]]; }
for m in $METHODS; do
  known_method "$m" || { echo "error: unknown method $m in METHODS ($known_methods)" >&2; exit 2; }
done
# The models: base (untrained), base_rope (the base model with the enlarged RoPE base and no training:
# what the base change alone does), one per METHODS, and one per VARIANTS entry.
# VARIANTS: space-separated NAME:METHOD[:KEY=VALUE,...], a method trained with overrides, e.g.
#   VARIANTS="longpo_lr5e-5:longpo:optim.lr=5e-5 longpo_lam0.1:longpo:loss.longpo_lambda=0.1 longpo_s30:longpo:train.steps=30"
# evaluated at VARIANT_EVAL_LENGTHS (default EVAL_LENGTHS).
declare -A method_of overrides_of
models=(base base_rope) variants=()
for m in $METHODS; do models+=("$m"); method_of[$m]=$m; overrides_of[$m]=""; done
for v in ${VARIANTS:-}; do
  IFS=: read -r name method ovr <<< "$v"
  [[ "$name" =~ ^[A-Za-z0-9_.-]+$ ]] && [ -z "${method_of[$name]:-}" ] && [ "$name" != base ] && [ "$name" != base_rope ] \
    || { echo "error: VARIANTS entry '$v': NAME must be new and of letters, digits, '_', '.', '-' (NAME:METHOD[:KEY=VALUE,...])" >&2; exit 2; }
  known_method "$method" || { echo "error: VARIANTS entry '$v': unknown method '$method' ($known_methods)" >&2; exit 2; }
  models+=("$name"); variants+=("$name"); method_of[$name]=$method; overrides_of[$name]=${ovr//,/ }
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
if nvidia-smi -L >/dev/null 2>&1; then slots=$NGPU; else slots=1; fi
trun() { $PY -m torch.distributed.run --nproc-per-node "${NPROC:-$NGPU}" --master-port=$((20000 + RANDOM % 20000)) "$@"; }  # NPROC: processes (default NGPU)

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
  [ -f "$W/docs.jsonl" ] || { log "documents"; $PY tools/make_long_documents.py --n "$DOCS" --words "$WORDS" --seed 0 --out "$W/docs.jsonl"; }
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
# The reference sidecars the methods need (and the control's data, on the CPU), side by side; with several
# GPUs each reference takes one GPU: short (LongPO: the base model on the short contexts), long (dpo: the
# base model on the long sequences at its own RoPE base), long_policy (dpo_policy: the same at ROPE, i.e.
# the initial policy)
ref_file() { case $1 in short) echo "$W/data.ref.safetensors";; long) echo "$W/data.longref.safetensors";;
  long_policy) echo "$W/data.longref_policy.safetensors";; esac; }
ref_flags() { case $1 in short) ;; long) echo "--reference-sees-policy";; long_policy) echo "--reference-sees-policy --rope-theta $ROPE";; esac; }
all_methods=" ${method_of[*]} "
needed=(short)
[[ "$all_methods" != *" dpo "* ]] || needed+=(long)
[[ "$all_methods" != *" dpo_policy "* ]] || needed+=(long_policy)
refs=() ref_pids=()
for which in "${needed[@]}"; do [ -f "$(ref_file $which)" ] || refs+=("$which"); done
if [ ${#refs[@]} -gt 0 ]; then
  before references 60
  r=0
  for which in "${refs[@]}"; do
    flags="$(ref_flags $which) --out $(ref_file $which)"
    log "reference: $which"
    if [ "$slots" -gt 1 ]; then
      CUDA_VISIBLE_DEVICES=$r NPROC=1 trun tools/precompute_ref_logps.py --data "$W/data" --model "$W/base" $flags \
        > "$W/ref_$which.log" 2>&1 & ref_pids+=($!)
      r=$(( (r + 1) % slots ))
    else
      trun tools/precompute_ref_logps.py --data "$W/data" --model "$W/base" $flags
    fi
  done
fi
if [[ "$all_methods" == *" docnll "* ]] && [ ! -f "$W/docnll_data.json" ]; then  # the control's data: the same documents alone
  log "preprocess the document-NLL control"
  $PY tools/document_nll_data.py "$W/pairs.jsonl" -o "$W/docnll.jsonl"
  $PY tools/preprocess_pairs.py --input "$W/docnll.jsonl" --kind pair --tokenizer "$HF" --output "$W/docnll_data" \
    --max-length "$CTX" --no-progress
fi
for p in "${ref_pids[@]}"; do wait "$p" || { echo "error: a reference computation failed:" >&2; tail -n 20 "$W"/ref_*.log >&2; exit 1; }; done
for which in "${needed[@]}"; do
  [ -f "$(ref_file $which)" ] || { echo "error: no $(ref_file $which); see $W/ref_$which.log" >&2; exit 1; }
done

# job NAME GPUS: train NAME (when it is a trained one and not trained yet), export it, evaluate it, on the
# GPUs GPUS (comma-separated; empty: all). Skips what exists; stops before a stage DEADLINE leaves no time for.
job() {
  local name=$1 gpus=$2 method=${method_of[$1]:-} n data extra dir rope lengths
  n=$(echo "$gpus" | awk -F, '{print NF}'); [ -n "$gpus" ] || n=$NGPU
  if [ -n "$method" ]; then
    data="$W/data"
    case $method in
      longpo) extra="loss.name=longpo loss.longpo_nll=sequence";;
      longpo_resp) extra="loss.name=longpo loss.longpo_nll=responses";;
      sft) extra="loss.name=sft";;
      dpo) extra="loss.name=dpo data.reference=$(ref_file long)";;
      dpo_policy) extra="loss.name=dpo data.reference=$(ref_file long_policy)";;
      docnll) extra="loss.name=sft" data="$W/docnll_data";;
    esac
    if [ ! -f "$W/$name/summary.json" ]; then
      before "training $name" "${TRAIN_SECONDS:-150}"
      log "train $name${gpus:+ on GPU $gpus}"
      ( [ -z "$gpus" ] || export CUDA_VISIBLE_DEVICES=$gpus
        NPROC=$n trun -m megatron_longpo.train --config examples/longpo_smollm2/train.yaml \
          model.checkpoint="$W/base" data.path="$data" data.global_batch_size="$GBS" model.rope_theta="$ROPE" optim.lr="$LR" \
          model.max_position_embeddings="$CTX" train.epochs="$EPOCHS" train.save_dir="$W/$name" $extra ${overrides_of[$name]} \
      ) > "$W/train_$name.log" 2>&1 || { echo "training $name failed; the end of $W/train_$name.log:"; tail -20 "$W/train_$name.log"; return 1; }
      grep "^done" "$W/train_$name.log" | tail -1 || true
    fi
    [ -f "$W/hf_$name/config.json" ] || $PY tools/convert_checkpoint.py megatron-to-hf --megatron-dir "$W/$name" --out "$W/hf_$name" \
      > "$W/export_$name.log" 2>&1 || { echo "export of $name failed; see $W/export_$name.log"; return 1; }
    dir="$W/hf_$name"
  else
    dir=$HF
  fi
  [ -f "$W/eval_$name.json" ] && return 0
  before "evaluating $name" "${EVAL_SECONDS:-200}"
  rope=$([ "$name" = base_rope ] && echo "--rope-theta $ROPE" || echo "")
  lengths=$EVAL_LENGTHS; [[ " ${variants[*]} " != *" $name "* ]] || lengths=${VARIANT_EVAL_LENGTHS:-$EVAL_LENGTHS}
  log "evaluate $name${gpus:+ on GPU ${gpus%%,*}}"
  env ${gpus:+CUDA_VISIBLE_DEVICES=${gpus%%,*}} $PY tools/eval_long.py --model "$dir" $rope --lengths $lengths \
    ${EVAL_TASKS:+--tasks $EVAL_TASKS} --samples "$EVAL_SAMPLES" --seed 0 --retention --no-progress --out "$W/eval_$name.json" \
    $EVAL_EXTRA > "$W/eval_$name.log" 2>&1 || [ $? = 3 ] || { echo "evaluation of $name failed; the end of $W/eval_$name.log:"; tail -20 "$W/eval_$name.log"; return 1; }
  log "evaluated $name"
}

# METHODS first (their evaluations follow), then the untrained models, then the VARIANTS. With one GPU
# group (one GPU, or TRAIN_GPUS=NGPU: data parallel over all GPUs) the jobs run one after another; with
# TRAIN_GPUS=1 (the default) on NGPU GPUs, JOBS_PER_GPU jobs run on each GPU side by side (a free slot
# takes the next job).
order=($METHODS base base_rope "${variants[@]}")
TRAIN_GPUS=${TRAIN_GPUS:-1}
groups=$(( slots / TRAIN_GPUS )); [ "$groups" -ge 1 ] || groups=1
per=$([ "$groups" -gt 1 ] && echo "${JOBS_PER_GPU:-1}" || echo 1)
declare -A slot_pid
failed=0
for m in "${order[@]}"; do
  while :; do  # a free slot
    free=""
    for ((s = 0; s < groups * per; s++)); do
      p=${slot_pid[$s]:-}; if [ -z "$p" ] || ! kill -0 "$p" 2>/dev/null; then free=$s; break; fi
    done
    [ -n "$free" ] && break
    wait -n || failed=1
  done
  g=$(( free % groups ))
  gpus=$([ "$groups" -gt 1 ] && seq -s, $((g * TRAIN_GPUS)) $(((g + 1) * TRAIN_GPUS - 1)) || echo "")
  if [ "$groups" -gt 1 ] || [ "$per" -gt 1 ]; then job "$m" "$gpus" & slot_pid[$free]=$!; else job "$m" "" || failed=1; fi
done
while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || failed=1; done
[ "$failed" = 0 ] || echo "some jobs failed (above); rerun to retry them" >&2
table=()
for m in "${models[@]}"; do
  if [ ! -f "$W/eval_$m.json" ]; then
    [ "$failed" = 1 ] || [ -z "${DEADLINE:-}" ] || { log "deadline: not every model was evaluated; rerun to resume"; exit 0; }
    echo "error: no $W/eval_$m.json (see $W/train_$m.log, $W/eval_$m.log); rerun to retry" >&2; exit 1
  fi
  table+=("$m=$W/eval_$m.json")
done
log "table"
$PY tools/eval_long.py --table "${table[@]}" | tee "$W/table.md"

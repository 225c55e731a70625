#!/usr/bin/env bash
# LongPO's iterative context extension ("self-evolution", docs/methods.md §2; docs/iterative.md).
#
# Round r (r = 1 .. ROUNDS) extends the previous model to L_r = L1 * 2^(r-1) tokens:
#   generator = initial policy = reference pi_S  := round r-1's exported HF model (round 1: BASE_HF)
#   import it (HF -> Megatron) -> documents -> self-generated pairs (pi_S: questions and chosen
#   answers on CHUNK_r-token chunks, rejected answers on the whole document) -> preprocess at L_r
#   -> reference log-probs on the short contexts with pi_S at ITS OWN RoPE base (the one its
#   config.json declares) -> train the policy at ROPE_r with model.max_position_embeddings = L_r
#   -> export to HF (config.json: rope_theta = ROPE_r, max_position_embeddings = L_r) -> check.
# RoPE base: ROPE_r = ROPE_{r-1} * ROPE_FACTOR (ROPE_0 = BASE_HF's own base); ROPE1, ROPE2, ... set a
# round's base directly. Every stage skips itself when its output exists (rerun to resume).
#
#   BASE_HF=/ckpt/Mistral-7B-Instruct-v0.2 bash examples/longpo_iterative/run.sh   # GPUs: 128K, then 256K
#   TINY=1 bash examples/longpo_iterative/run.sh      # the script itself on the CPU: 512 -> 1024 tokens
#
# Knobs (environment; defaults below): W (work dir), BASE_HF (pi_S, a HF directory), ROUNDS, L1,
# ROPE_FACTOR, ROPE1.., CHUNK1.. (default L_r/4), DOCS_IN (your own JSONL/Parquet/text documents;
# default: tools/make_long_documents.py gazetteers of WORDS_r = L_r*WORDS_PER_TOKEN words), DOCS,
# GEN_TOKENS, ANSWER_TEMPERATURE (of the chosen answers; 0: greedy, as the paper; rejected answers keep the
# reference's T 1.0), GEN_EXTRA (extra tools/build_longpo_pairs.py flags), CFG1.. (round YAMLs), STEPS
# (optimizer steps per round; empty: the YAML's epochs), TRAIN_EXTRA (extra key=value overrides),
# NGPU (processes per node for the reference and the training), LAUNCH (the launcher; multi-node:
# your torchrun with --nnodes/--rdzv-*), PY.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
R=examples/longpo_iterative
if [ "${TINY:-0}" = 1 ]; then
  : "${W:=runs/longpo_iterative_tiny}" "${L1:=512}" "${DOCS:=3}" "${WORDS_PER_TOKEN:=0.35}" "${GEN_TOKENS:=16}" "${STEPS:=2}"
  : "${CFG1:=$R/tiny.yaml}" "${CFG2:=$R/tiny.yaml}" "${NGPU:=1}"
  : "${GEN_EXTRA:=--device cpu --dtype float32 --threads 1 --question-max-new-tokens 48 --any-question-count}"
  : "${BASE_HF:=$($PY -c "from megatron_longpo.models.embedded import materialize_default_model as m; print(m())")}"
fi
: "${W:=runs/longpo_iterative}" "${ROUNDS:=2}" "${L1:=131072}" "${ROPE_FACTOR:=10}" "${DOCS:=1000}" "${GEN_TOKENS:=1024}" "${ANSWER_TEMPERATURE:=0}"
: "${WORDS_PER_TOKEN:=0.45}" "${STEPS:=}" "${TRAIN_EXTRA:=}" "${GEN_EXTRA:=--dtype bfloat16 --batch-size 1}"
: "${NGPU:=$(nvidia-smi -L 2>/dev/null | wc -l | awk '{print ($1 > 0) ? $1 : 1}')}"
: "${LAUNCH:=$PY -m torch.distributed.run --nproc-per-node $NGPU --master-port=$((20000 + RANDOM % 20000))}"
[ -n "${BASE_HF:-}" ] && [ -f "$BASE_HF/config.json" ] || {
  echo "error: BASE_HF must name pi_S as a Hugging Face directory (config.json, weights, tokenizer), e.g." \
       "BASE_HF=/ckpt/Mistral-7B-Instruct-v0.2; got '${BASE_HF:-}' (or run TINY=1 for the CPU check)" >&2; exit 2; }
mkdir -p "$W"
log() { echo "== $(date +%H:%M:%S) $*"; }
json_get() {  # json_get FILE KEY: a top-level value of a JSON file
  $PY -c "import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"
}
ckpt_arch() {  # ckpt_arch DIR FIELD: the architecture a megatron-longpo checkpoint records (model.json)
  $PY -c "import json, sys; print(json.load(open(sys.argv[1] + '/model.json'))['arch'][sys.argv[2]])" "$1" "$2"
}

gen=$BASE_HF
for ((r = 1; r <= ROUNDS; r++)); do
  d=$W/round$r
  L=$((L1 << (r - 1)))
  mkdir -p "$d"
  log "round $r: generator / initial policy / reference = $gen; target length $L"

  [ -f "$d/init/latest" ] || { log "round $r: import $gen (HF -> Megatron): the initial policy and the reference"
    $PY tools/convert_checkpoint.py hf-to-megatron --hf-dir "$gen" --out "$d/init"; }
  base_theta=$(ckpt_arch "$d/init" rope_theta)  # pi_S's own base: the reference is scored at it
  v=ROPE$r; theta=${!v:-$($PY -c "import sys; print(float(sys.argv[1]) * float(sys.argv[2]))" "$base_theta" "$ROPE_FACTOR")}
  v=CHUNK$r; chunk=${!v:-$((L / 4))}
  v=CFG$r; cfg=${!v:-$R/round$r.yaml}
  log "round $r: RoPE base $base_theta (reference) -> $theta (policy); chunks of $chunk tokens; pairs up to $L tokens; $cfg"

  docs=${DOCS_IN:-$d/docs.jsonl}
  [ -n "${DOCS_IN:-}" ] || [ -f "$docs" ] || { log "round $r: documents"
    $PY tools/make_long_documents.py --n "$DOCS" --words "$($PY -c "print(int($L * $WORDS_PER_TOKEN))")" --seed "$r" --out "$docs"; }

  # the generator's length budget counts the chat template approximately: keep a margin under L
  if [ ! -f "$d/data.json" ]; then
    log "round $r: self-generated pairs with $gen"
    rc=0
    $PY tools/build_longpo_pairs.py "$docs" -o "$d/pairs.jsonl" --backend transformers --model "$gen" \
      --max-chunk-tokens "$chunk" --max-chunks 4 --questions-per-chunk 1 --max-pair-tokens $((L - L / 32)) \
      --max-new-tokens "$GEN_TOKENS" --chosen-temperature "$ANSWER_TEMPERATURE" --seed "$r" --no-progress $GEN_EXTRA || rc=$?
    [ $rc = 0 ] || [ $rc = 3 ] || { echo "error: generation failed (status $rc); rerun to resume" >&2; exit $rc; }
    [ -s "$d/pairs.jsonl" ] || { echo "error: round $r generated no pair (see $d/pairs.jsonl.summary.json)" >&2; exit 1; }
    log "round $r: preprocess at $L tokens"
    $PY tools/preprocess_pairs.py --input "$d/pairs.jsonl" --kind longpo --tokenizer "$gen" --output "$d/data" \
      --max-length "$L" --no-progress
  fi
  [ -f "$d/data.ref.safetensors" ] || { log "round $r: reference log-probs on the short contexts (pi_S at RoPE base $base_theta)"
    $LAUNCH tools/precompute_ref_logps.py --data "$d/data" --model "$d/init"; }

  if [ ! -f "$d/train/summary.json" ]; then
    log "round $r: train the policy at RoPE base $theta, max_position_embeddings $L"
    $LAUNCH -m megatron_longpo.train --config "$cfg" model.checkpoint="$d/init" data.path="$d/data" \
      model.rope_theta="$theta" model.max_position_embeddings="$L" train.save_dir="$d/train" \
      ${STEPS:+train.steps=$STEPS} $TRAIN_EXTRA
  fi
  [ -f "$d/hf_round$r/config.json" ] || { log "round $r: export to HF"
    $PY tools/convert_checkpoint.py megatron-to-hf --megatron-dir "$d/train" --out "$d/hf_round$r"; }

  got_theta=$(json_get "$d/hf_round$r/config.json" rope_theta) got_len=$(json_get "$d/hf_round$r/config.json" max_position_embeddings)
  $PY -c "import sys; sys.exit(float(sys.argv[1]) != float(sys.argv[2]) or int(sys.argv[3]) != int(sys.argv[4]))" \
    "$got_theta" "$theta" "$got_len" "$L" || {
    echo "error: $d/hf_round$r/config.json says rope_theta $got_theta, max_position_embeddings $got_len;" \
         "round $r trained at $theta, $L" >&2; exit 1; }
  log "round $r done: $d/hf_round$r (rope_theta $got_theta, max_position_embeddings $got_len)"
  gen=$d/hf_round$r
done
log "final model: $gen"

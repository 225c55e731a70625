#!/usr/bin/env bash
# GPU checks and measurements, run on a GPU machine after Transformer Engine and megatron-core are
# installed (see docs/foundation.md, "GPU"). Every number quoted in docs/ for a GPU comes from here.
#   bash tools/run_gpu_checks.sh tests|bench|train(=train16)|all|diag|attn|cpgrads|prefix|bench_step|train_tp2|longpo_run|maxlen|demo|numerics|fit7b
# Logs go to $OUT (default /tmp/gpu-out).
set -uo pipefail
what=${1:-all}
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export MEGATRON_LONGPO_CACHE=${MEGATRON_LONGPO_CACHE:-/tmp/mlp-cache}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
NGPU=$(nvidia-smi -L | wc -l)
trun() { torchrun --master-port=$((20000 + RANDOM % 20000)) "$@"; }

if [ "$what" = demo ]; then
  # the README's GPU quick start on GPU 0 (bf16, TE spec), with Python's warnings NOT silenced here:
  # demo_gpu_warnings.txt counts the warning lines a user would see (megatron_longpo/quiet.py)
  start=$SECONDS
  ( unset PYTHONWARNINGS; CUDA_VISIBLE_DEVICES=0 python3 -m megatron_longpo.demo --work-dir /tmp/gpu-demo ) > "$OUT/demo_gpu.log" 2>&1
  echo "demo rc=$? wall $((SECONDS - start)) s" >> "$OUT/demo_gpu.log"
  grep -E "Warning: |^W[0-9]{4} |^note: |^\[transformers\] |^DistributedDataParallel: |%\|" "$OUT/demo_gpu.log" > "$OUT/demo_gpu_warnings.txt"
  wc -l < "$OUT/demo_gpu_warnings.txt"
fi
if [ "$what" = tests ] || [ "$what" = all ]; then
  python3 -m pytest -q -m gpu tests/test_gpu.py -s -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
fi
if [ "$what" = numerics ]; then  # one step's bf16 gradient against transformers' on the same batch
  python3 tools/check_numerics.py --json $OUT/numerics_documents.json 2>&1 | grep -v -i warn | tee $OUT/numerics.log
  python3 tools/check_numerics.py --synthetic-words 3000 --json $OUT/numerics_synthetic.json 2>&1 | grep -v -i warn | tee -a $OUT/numerics.log
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 tools/bench_logprobs.py 2>&1 | tee "$OUT/bench_logprobs.log"
fi
prepare_small() {  # SmolLM2 checkpoint + 8 LongPO samples with ~4K-token contexts and their reference
  W=/tmp/gpu-cp; mkdir -p $W
  HF=${HF:-$(python3 -c "from megatron_longpo.models.embedded import materialize_default_model as m; print(m())")}
  C=$W/smol D=$W/long4k
  [ -f $C/latest ] || python3 tools/convert_checkpoint.py hf-to-megatron --hf-dir "$HF" --out $C >/dev/null
  if [ ! -f $D.ref.safetensors ]; then
    python3 tools/make_synthetic_pairs.py --kind longpo --n 8 --context-words 3000 --out $W/long4k.jsonl
    python3 tools/preprocess_pairs.py --input $W/long4k.jsonl --kind longpo --tokenizer "$HF" --output $D --fresh --no-progress >/dev/null
    trun --nproc-per-node 1 tools/precompute_ref_logps.py --data $D --model $C >/dev/null 2>&1
  fi
}
if [ "$what" = diag ] || [ "$what" = attn ]; then
  echo "== TE THD attention, CP=2 vs one GPU" >>$OUT/diag.log
  timeout -k 5 120 torchrun --nproc-per-node 2 --master-port=$((20000 + RANDOM % 20000)) tests/workers/gpu_cp_diag.py 2>&1 | grep "^rank" >>$OUT/diag.log
fi
prepare_random() {  # the GPU tests' random 8-layer Llama (tests/fixtures.gpu_llama) as a checkpoint: $R/ckpt
  prepare_small
  R=/tmp/gpu-random; mkdir -p $R
  [ -f $R/ckpt/latest ] || { python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'tests'); \
from fixtures import gpu_llama; gpu_llama(Path('$R/hf'), Path('$HF'))" \
    && python3 tools/convert_checkpoint.py hf-to-megatron --hf-dir $R/hf --out $R/ckpt >/dev/null; }
}
if [ "$what" = diag ] || [ "$what" = cpgrads ]; then
  prepare_small
  L=$OUT/diag.log
  # grads GPUS OUT.pt LOG overrides...: one step's gradients ($GPU: which GPU a one-GPU run takes)
  grads() { local n=$1 out=$2 log=$3; shift 3
    [ -f "$out" ] || env ${GRADS_ENV:-} ${GPU:+CUDA_VISIBLE_DEVICES=$GPU} timeout -k 5 240 torchrun --nproc-per-node "$n" \
      --master-port=$((20000 + RANDOM % 20000)) tests/workers/gpu_checks.py grads "$out" $common "$@" >>"$log" 2>&1; }
  other=$([ "$NGPU" -ge 2 ] && echo 1 || echo 0)
  # CP_MODELS: the random Llama (tests/fixtures.gpu_llama) and SmolLM2; CP_LOSSES: LongPO and SFT
  # (NLL only: no chosen-minus-rejected difference in its gradient)
  for model in ${CP_MODELS:-random smollm2}; do
  if [ "$model" = random ]; then prepare_random; ckpt=$R/ckpt; else ckpt=$C; fi
  for loss in ${CP_LOSSES:-longpo sft}; do
  P=$W/$model.$loss
  echo "== per-parameter gradients, $model, $loss, CP=2 vs CP=1" >>$L
  common="model.checkpoint=$ckpt data.path=$D data.global_batch_size=2 train.steps=1 loss.name=$loss loss.longpo_lambda=1.0 optim.distributed_optimizer=false model.bf16=true train.save_dir=$W/unused train.tensorboard=false"
  # CP2_ENV: e.g. CUDA_LAUNCH_BLOCKING=1 (a stream race would vanish) or NVTE_ALLOW_NONDETERMINISTIC_ALGO=0
  rm -f $P.cp2.pt; GRADS_ENV=${CP2_ENV:-} grads 2 $P.cp2.pt $OUT/cp_runs.log parallel.context_parallel=2
  echo "CP=2 run with env: ${CP2_ENV:-none}" >>$L
  # the one-GPU runs, two at a time: bf16 TE (CP=1); the packing floor (2 samples per micro-batch);
  # the fp32 reference (local spec, no TE); a bf16 floor with no CP in it (the local spec's unfused attention)
  GPU=0 grads 1 $P.cp1.pt $OUT/cp_runs.log & GPU=$other grads 1 $P.mb2.pt $OUT/cp_runs.log data.samples_per_microbatch=2 & wait
  GPU=0 grads 1 $P.ref32.pt $OUT/cp_runs.log model.bf16=false model.transformer_engine=false &
  GPU=$other grads 1 $P.local16.pt $OUT/cp_runs.log model.transformer_engine=false & wait
  python3 tools/compare_grads.py $P >>$L 2>&1
  done; done
fi
if [ "$what" = prefix ]; then
  python3 -m pytest -q -m gpu tests/test_gpu.py -k prefix_shared -s -p no:cacheprovider 2>&1 | grep -v "Warn\|warn" | tail -30 > "$OUT/prefix.log"
fi
if [ "$what" = bench_step ]; then
  # one process per configuration (a process that ran out of memory keeps some)
  # CONFIGS: "layout recompute lengths [flags]" items separated by ';'. PROFILE=N prints each step's N costliest kernels
  L=${LENGTHS:-16384,32768,65536,131072}
  IFS=';' read -ra configs <<< "${CONFIGS:-two none $L;shared none $L;two full ${FULL_LENGTHS:-65536,131072};shared full ${FULL_LENGTHS:-131072}}"
  for c in "${configs[@]}"; do
    set -- $c
    rc=$([ "$2" = full ] && echo "--recompute full" || echo "")
    CUDA_VISIBLE_DEVICES=0 timeout -k 5 200 python3 tools/bench_train_step.py --gpus 1 --layers 4 \
      --layouts $1 $rc --lengths $3 ${@:4} --iters 2 ${PROFILE:+--profile $PROFILE} --jsonl $OUT/bench_step.jsonl 2>&1 \
      | grep -v "Warn\|warn\|USDT" | tail -$((8 + 2 * ${PROFILE:-0} + 8)) >> "$OUT/bench_step.log"
  done
  python3 tools/bench_train_step.py --table $OUT/bench_step.jsonl | tee -a "$OUT/bench_step.log"
fi
if [ "$what" = train16 ] || [ "$what" = train ] || [ "$what" = all ]; then
  # SmolLM2, LongPO, 8 synthetic samples of ~16K tokens; CP=2 for 6 steps, and the first step at CP=1
  W=/tmp/gpu-train; mkdir -p $W
  HF=$(python3 -c "from megatron_longpo.models.embedded import materialize_default_model as m; print(m())")
  [ -f $W/smol/latest ] || python3 tools/convert_checkpoint.py hf-to-megatron --hf-dir "$HF" --out $W/smol >/dev/null
  if [ ! -f $W/long16k.ref.safetensors ]; then
    python3 tools/make_synthetic_pairs.py --kind longpo --n 8 --context-words 11500 --out $W/long16k.jsonl
    python3 tools/preprocess_pairs.py --input $W/long16k.jsonl --kind longpo --tokenizer "$HF" --output $W/long16k --fresh --no-progress 2>&1 | tail -4
    trun --nproc-per-node 2 tools/precompute_ref_logps.py --data $W/long16k --model $W/smol 2>&1 | grep -v Warn | tail -2
  fi
  for n in $([ "$NGPU" -ge 2 ] && echo "2 1" || echo 1); do
    steps=$([ $n = 2 ] || [ "$NGPU" = 1 ] && echo 6 || echo 1)
    timeout -k 5 150 torchrun --nproc-per-node $n --master-port=$((20000 + RANDOM % 20000)) -m megatron_longpo.train \
      model.checkpoint=$W/smol data.path=$W/long16k parallel.context_parallel=$n model.bf16=true model.rope_theta=1000000 \
      loss.name=longpo loss.longpo_lambda=0.01 data.global_batch_size=2 train.steps=$steps optim.lr=2e-5 optim.warmup_fraction=0 \
      train.save_dir=$W/run_cp$n train.stall_seconds=40 train.tensorboard=false ${EXTRA:-} 2>&1 | grep -v "it/s\]\|Warn\|warn" | tail -14 >> "$OUT/train16.log"
  done
fi
if [ "$what" = train_tp2 ]; then
  # a small random Llama (8 heads / 4 KV heads: TP=2 divides them) on the ~4K-token LongPO data:
  # TP=2 (and TP=2 with sequence parallelism) on 2 GPUs vs TP=1 on one; 4 steps each
  prepare_random; T=$R  # (prepare_random runs prepare_small: $D, $HF)
  # TP_VARIANTS: which layouts, ';'-separated "GPUS overrides..." (default: all three)
  IFS=';' read -ra variants <<< "${TP_VARIANTS:-1 parallel.tensor_parallel=1;2 parallel.tensor_parallel=2;2 parallel.tensor_parallel=2 parallel.sequence_parallel=true}"
  for v in "${variants[@]}"; do
    set -- $v; n=$1; shift
    echo "== $n GPU(s): $*" >> "$OUT/train_tp2.log"
    timeout -k 5 240 torchrun --nproc-per-node $n --master-port=$((20000 + RANDOM % 20000)) -m megatron_longpo.train \
      model.checkpoint=$T/ckpt data.path=$D model.bf16=true loss.name=longpo data.global_batch_size=2 train.steps=4 \
      optim.lr=1e-4 optim.warmup_fraction=0 train.save_dir=$T/run_$RANDOM train.tensorboard=false train.stall_seconds=40 "$@" 2>&1 \
      | grep " step [0-9]\|^done\|rror" | tail -8 >> "$OUT/train_tp2.log"
  done
fi
if [ "$what" = longpo_run ]; then
  # the SmolLM2 experiment: examples/longpo_smollm2/run.sh (knobs through the environment); the packed
  # pairs come back too (commit pairs.compact.jsonl.gz as examples/longpo_smollm2/pairs.compact.jsonl.gz)
  W=${W:-/tmp/longpo_smollm2} bash examples/longpo_smollm2/run.sh 2>&1 | grep --line-buffered -v "Warn\|warn\|it/s\]" | tee "$OUT/longpo_run.log"
  cp ${W:-/tmp/longpo_smollm2}/table.md ${W:-/tmp/longpo_smollm2}/eval_*.json ${W:-/tmp/longpo_smollm2}/pairs.compact.jsonl.gz \
    ${W:-/tmp/longpo_smollm2}/pairs.jsonl.summary.json "$OUT/" 2>/dev/null
fi
if [ "$what" = maxlen ]; then
  # the longest pair on NGPU GPUs (CP=NGPU): the full 32-layer Mistral-7B shape (random weights), one prefix-shared
  # LongPO pair, the paper's NLL, full recompute, Adam on the CPU for FRACTION of the parameters, bf16
  # gradient buffer (the memory settings of fit7b, which found the longest pair on ONE H200); every
  # length its own process (bench_train_step.py), rows to $OUT/maxlen.jsonl as they finish
  F=${FRACTION:-0.75}
  for n in ${LENGTHS:-262144}; do
    timeout -k 5 ${PROBE_SECONDS:-420} python3 tools/bench_train_step.py --gpus $NGPU --cp $NGPU --layers 32 --layouts shared \
      --longpo-nll sequence --recompute full --offload $F --grad-dtype bf16 --lengths $n --warmup 1 --iters 1 \
      --jsonl $OUT/maxlen.jsonl 2>&1 | grep -v "Warn\|warn\|USDT" | tail -30 >> "$OUT/maxlen.log"
  done
  python3 tools/bench_train_step.py --table $OUT/maxlen.jsonl | tee $OUT/maxlen_table.md
  free -g > $OUT/maxlen_host.txt
fi
if [ "$what" = fit7b ] || [ "$what" = fit7b_longest ]; then
  # the full 7B on ONE H200: the full 32-layer Mistral-7B shape (random weights), one prefix-shared
  # LongPO pair, the paper's NLL (loss.longpo_nll=sequence), full recompute, Adam on the CPU for
  # FRACTION of the parameters (precision-aware: no fp32 parameter copy on the GPU), bf16 gradient
  # buffer. Every configuration / probe is its own process (bench_train_step.py); rows go to
  # $OUT/fit7b.jsonl as they finish.
  #   fit7b (~6.5 min): the plan, then s/pair, tokens/s, peak vs plan at 32K, 64K, 128K
  #   fit7b_longest (~4-7 min): the longest pair: PROBE_FROM (144K) up to PROBE_MAX (160K: out of memory
  #   after a warm-up step), bisecting at 16K while the deadline allows
  F=${FRACTION:-0.75}
  common="--gpus 1 --layers 32 --layouts shared --longpo-nll sequence --recompute full --offload $F --grad-dtype bf16"
  if [ "$what" = fit7b ]; then
    python3 -m megatron_longpo.train --plan --hf-config <(python3 -c "import json,sys; sys.path.insert(0,'tools'); \
from bench_train_step import MISTRAL_7B as m; print(json.dumps({**m,'num_hidden_layers':32,'max_position_embeddings':262144}))") \
      --length 131072 data.share_prefix=true model.recompute=full optim.cpu_offload=true optim.offload_fraction=$F \
      optim.grad_dtype=bf16 > $OUT/fit7b_plan.txt 2>&1
    CUDA_VISIBLE_DEVICES=0 python3 tools/bench_train_step.py $common --lengths ${LENGTHS:-32768,65536,131072} \
      --warmup 1 --iters 1 --timeout ${A_SECONDS:-390} --jsonl $OUT/fit7b.jsonl 2>&1 \
      | grep -v "Warn\|warn\|USDT" | tail -30 > $OUT/fit7b_A.log
  else
    CUDA_VISIBLE_DEVICES=0 python3 tools/bench_train_step.py $common --until-oom --lengths ${PROBE_FROM:-147456} \
      --max-length ${PROBE_MAX:-163840} --granularity 16384 --warmup 1 --iters 1 --deadline ${B_DEADLINE:-240} \
      --timeout ${B_SECONDS:-300} --jsonl $OUT/fit7b.jsonl 2>&1 | grep -v "Warn\|warn\|USDT" | tail -30 > $OUT/fit7b_B.log
  fi
  python3 tools/bench_train_step.py --table $OUT/fit7b.jsonl > $OUT/fit7b_table.md
  free -g > $OUT/fit7b_host.txt
fi
if [ "$what" = memextra ]; then
  # the other memory keys on 4 Mistral-7B layers, one process per configuration:
  # model.activation_offload_layers (megatron-core refuses it with recompute, so none here) against
  # the same run without it, and optim.offload_overlap against offload without overlap (host peak
  # in the rows' "host GiB")
  for a in 0 ${ACT_LAYERS:-3}; do
    CUDA_VISIBLE_DEVICES=0 timeout -k 5 150 python3 tools/bench_train_step.py --gpus 1 --layers 4 --layouts shared \
      --lengths ${ACT_LENGTHS:-32768} --activation-offload $a --warmup 1 --iters 2 --jsonl $OUT/memextra.jsonl 2>&1 \
      | grep -v "Warn\|warn\|USDT" | tail -12 >> $OUT/memextra.log
  done
  for o in "" --offload-overlap; do
    CUDA_VISIBLE_DEVICES=0 timeout -k 5 150 python3 tools/bench_train_step.py --gpus 1 --layers 4 --layouts shared \
      --lengths 32768 --recompute full --offload 1.0 --grad-dtype bf16 $o --warmup 1 --iters 2 \
      --jsonl $OUT/memextra.jsonl 2>&1 | grep -v "Warn\|warn\|USDT" | tail -12 >> $OUT/memextra.log
  done
  python3 tools/bench_train_step.py --table $OUT/memextra.jsonl | tee $OUT/memextra_table.md
fi
if [ "$what" = gen20 ]; then
  # self-generated LongPO pairs from SmolLM2 with ~15K-token documents, kv_decode (the
  # transformers backend's default). AB=N first times N documents with both decoders (records/s).
  # Resumable: a rerun continues $W/pairs.jsonl. The pairs come back gzipped in $OUT.
  W=/tmp/gen20; mkdir -p $W
  HF=$(python3 -c "from megatron_longpo.models.embedded import materialize_default_model as m; print(m())")
  # FROM=K: only documents K.. of the DOCS (the first K were generated before; the
  # committed compact file's header says which: "documents_generated_on")
  [ -f $W/docs.jsonl ] || { python3 tools/make_long_documents.py --n ${DOCS:-512} --words ${WORDS:-9300} --seed 0 --out $W/all.jsonl \
    && tail -n +$((${FROM:-0} + 1)) $W/all.jsonl > $W/docs.jsonl; }
  gen() { local in=$1 out=$2 secs=$3; shift 3
    timeout -s INT $secs python3 tools/build_longpo_pairs.py $in -o $out --backend transformers --model "$HF" \
      --chunk-tokens 3000 --max-chunks 4 --questions-per-chunk 1 --max-pair-tokens 15872 --max-new-tokens 256 \
      --question-max-new-tokens 128 --no-progress --dtype bfloat16 "$@"; }
  if [ "${AB:-0}" -gt 0 ] && [ ! -f $OUT/gen20_ab.log ]; then
    head -n $AB $W/docs.jsonl > $W/ab.jsonl
    for d in generate prefill; do
      echo "== --decode $d, $AB documents" >> $OUT/gen20_ab.log
      start=$SECONDS; gen $W/ab.jsonl $W/ab_$d.jsonl ${AB_SECONDS:-150} --decode $d --batch-size ${AB_BS:-16} \
        --docs-per-batch $AB 2>&1 | grep -v -i warn >> $OUT/gen20_ab.log
      echo "wall $((SECONDS - start)) s" >> $OUT/gen20_ab.log
    done
  fi
  start=$SECONDS
  gen $W/docs.jsonl $W/pairs.jsonl ${GEN_SECONDS:-420} --batch-size ${BS:-128} --docs-per-batch ${DPB:-64} 2>&1 \
    | grep -v -i warn | tee -a $OUT/gen20.log
  echo "wall $((SECONDS - start)) s; $(wc -l < $W/pairs.jsonl) records in $W/pairs.jsonl" | tee -a $OUT/gen20.log
  gzip -c $W/pairs.jsonl > $OUT/pairs.jsonl.gz; cp $W/pairs.jsonl.summary.json $OUT/ 2>/dev/null
  ls -la $OUT/pairs.jsonl.gz
fi

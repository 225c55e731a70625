#!/usr/bin/env bash
# Both data builders on the embedded SmolLM2-135M-Instruct, in-process on the CPU (docs/generation.md):
# LongPO pairs from the three example documents, SoLoPO pairs from the ten synthetic QA records.
# The example documents (622-957 tokens) are far under SmolLM2's 8K window, whose derived chunk
# bounds would be 3,774-6,912 tokens: the LongPO command gives the maximum itself (the minimum is
# derived from it: 163). Everything else is the reference's defaults (N = 4 questions, exactly 4
# must parse; 20 lead phrases; rejected single-turn at T 1.0) except the token budgets, cut for a CPU.
#
#   bash examples/generation/run.sh [OUT_DIR]        # default /tmp/generation_example
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${1:-/tmp/generation_example}
mkdir -p "$OUT"
M=$($PY -c "from megatron_longpo.models.embedded import materialize_default_model as m; print(m())")

$PY tools/build_longpo_pairs.py megatron_longpo/resources/documents -o "$OUT/longpo.jsonl" --model "$M" --threads 1 \
  --max-chunk-tokens 300 --max-chunks 2 --question-max-new-tokens 120 --max-new-tokens 64 \
  --max-pair-tokens 4000 --docs-per-batch 3 --no-progress

# chain-of-thought responses ("... Answer: X"): 128 new tokens leave room for a short reasoning
$PY tools/build_solopo_pairs.py examples/generation/qa.jsonl -o "$OUT/solopo.jsonl" --model "$M" --threads 1 \
  --batch-size 10 --samples 4 --max-new-tokens 128 --target-long-tokens 400 --records-per-batch 10 --no-progress

echo "summaries: $OUT/longpo.jsonl.summary.json $OUT/solopo.jsonl.summary.json"

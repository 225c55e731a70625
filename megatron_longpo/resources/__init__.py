"""The data the package's defaults read, shipped inside the package (so that a non-editable
`pip install .` runs the demo and the evaluation as a checkout does):

- `PAIRS`, `LONGPO`, `SOLOPO`: a few records of each input format (docs/data.md); `LONGPO` is
  the demo's training data;
- `DOCUMENTS`: three short offline prose documents (Markdown): the evaluation's needle
  haystacks and held-out perplexity, the numerics check's prompt, the LongPO generation example;
- `RETENTION_QA`: the hand-written short-context questions of the retention check.
"""
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAIRS = HERE / "pairs.jsonl"
LONGPO = HERE / "longpo.jsonl"
SOLOPO = HERE / "solopo.jsonl"
DOCUMENTS = HERE / "documents"
RETENTION_QA = HERE / "retention_qa.jsonl"

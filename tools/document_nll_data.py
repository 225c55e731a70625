#!/usr/bin/env python
"""The document-NLL control's data: the long documents of a LongPO pairs JSONL as SFT records.

    python tools/document_nll_data.py pairs.jsonl -o docnll.jsonl
    python tools/preprocess_pairs.py --input docnll.jsonl --kind pair --tokenizer HF --output docnll ...
    ... megatron_longpo.train loss.name=sft data.path=docnll

Each distinct `long_context` becomes {"prompt": "Write the document.", "chosen": DOCUMENT,
"rejected": "-"}; with loss.name=sft the loss is the documents' mean token NLL
(data/document_nll.py). Exit status: 0 done; 2 a bad input (the message names the line).
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_longpo.data.document_nll import document_nll_records
from megatron_longpo.generation.output import iter_jsonl
from megatron_longpo.io import atomic_write


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pairs", help="a LongPO pairs JSONL (tools/build_longpo_pairs.py)")
    p.add_argument("--out", "-o", required=True)
    a = p.parse_args(argv)

    def contexts():
        for lineno, row in iter_jsonl(a.pairs):
            text = row.get("long_context") if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{a.pairs}:{lineno}: no long_context string (is this a LongPO pairs file?)")
            yield text

    try:
        n = 0
        with atomic_write(a.out) as f:
            for rec in document_nll_records(contexts()):
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} documents as SFT records to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Keep self-generated LongPO pairs in a compact committed form, and rebuild them exactly.

Pairs made by tools/build_longpo_pairs.py from tools/make_long_documents.py documents repeat the
document in every line; `pack` keeps only the generated text (instructions, chosen and rejected
answers), the short contexts' spans and the meta, with the documents' parameters in a header
(generation/compact.py). `unpack` rebuilds the documents and writes back a pairs JSONL identical
to the original, record by record (each checked against its digest).

    python tools/pack_pairs.py pack runs/x/pairs.jsonl -o examples/longpo_smollm2/pairs.compact.jsonl.gz \\
        --docs-n 64 --docs-words 7500 --docs-seed 0 --setting chunk_tokens=3000 --setting max_new_tokens=256
    python tools/pack_pairs.py unpack examples/longpo_smollm2/pairs.compact.jsonl.gz -o pairs.jsonl \\
        [--docs-out docs.jsonl]

Exit status: 0 done; 2 a bad input (the message names the file and line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_longpo.generation.compact import CompactError, Gazetteers, pack, unpack


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="pairs JSONL -> compact gzip JSONL")
    pk.add_argument("pairs")
    pk.add_argument("--out", "-o", required=True)
    pk.add_argument("--docs-n", type=int, required=True, help="make_long_documents.py --n")
    pk.add_argument("--docs-words", type=int, required=True, help="make_long_documents.py --words")
    pk.add_argument("--docs-seed", type=int, required=True, help="make_long_documents.py --seed")
    pk.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                    help="a generation setting to record in the header (repeatable)")
    up = sub.add_parser("unpack", help="compact gzip JSONL -> pairs JSONL (and the documents)")
    up.add_argument("compact")
    up.add_argument("--out", "-o", required=True)
    up.add_argument("--docs-out", help="also write the documents JSONL make_long_documents.py wrote")
    a = p.parse_args(argv)
    try:
        if a.cmd == "pack":
            settings = {}
            for s in a.setting:
                key, eq, value = s.partition("=")
                if not eq or not key:
                    raise CompactError(f"--setting {s!r}: write KEY=VALUE")
                settings[key] = value
            summary = a.pairs + ".summary.json"  # build_longpo_pairs.py's run summary, when beside it
            if os.path.isfile(summary):
                with open(summary, encoding="utf-8") as f:
                    s = json.load(f)
                settings["summary"] = {k: s.get(k) for k in ("counts", "dropped", "failures")}
            h = pack(a.pairs, a.out, Gazetteers(a.docs_n, a.docs_words, a.docs_seed), settings)
            size = os.path.getsize(a.out)
            print(f"packed {h['records']} records into {a.out} ({size} bytes, "
                  f"{size / max(1, h['records']):.0f} bytes a record; the pairs JSONL: {os.path.getsize(a.pairs)} bytes)")
        else:
            h = unpack(a.compact, a.out, a.docs_out)
            print(f"unpacked {h['records']} records into {a.out}" + (f" and the documents into {a.docs_out}"
                                                                     if a.docs_out else ""))
    except (ValueError, OSError) as e:  # CompactError is one; a pairs line that is not JSON another
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Rebuild the evaluation's offline inputs from this Python's standard library (docs/evaluation.md):

  python tools/make_eval_corpus.py [--out megatron_longpo/eval/data]

- haystack_python_reference.txt: the prose paragraphs of the Python Language Reference that CPython
  ships (pydoc_data/topics.py): no indented blocks (code, grammar, tables), >= 20 words, ending like a
  sentence, no braces, doctest prompts or grammar rules;
- heldout_python_docstrings.jsonl: docstrings of the standard library (modules, classes, functions;
  not tests, idlelib, tkinter ...), the same prose filter, >= 60 words, none sharing a sentence with
  the haystack, duplicates dropped.

Both are PSF-2.0. The committed files were made with Python 3.12.1; another version gives other text.
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import sysconfig
from pathlib import Path

SKIP = ("test", "idlelib", "lib2to3", "site-packages", "turtledemo", "pydoc_data", "ensurepip", "venv", "tkinter")


def prose_paragraphs(text: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.split("\n")
        if any(line.startswith((" ", "\t")) for line in lines):
            continue
        p = " ".join(line.strip() for line in lines)
        if set(p) <= set("*=-~^ ") or len(p.split()) < 20 or not p.endswith((".", ":", "?", "!")):
            continue
        if re.search(r"[{}]|>>>|::=", p):
            continue
        out.append(p)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "megatron_longpo" / "eval" / "data"))
    a = p.parse_args(argv)
    from pydoc_data import topics

    paras = [x for name in sorted(topics.topics) for x in prose_paragraphs(topics.topics[name])]
    hay = "\n\n".join(paras)
    out = Path(a.out)
    (out / "haystack_python_reference.txt").write_text(hay + "\n")
    hay_sents = {s.strip() for s in re.split(r"(?<=[.!?])\s+", hay) if len(s.split()) >= 6}
    lib = Path(sysconfig.get_paths()["stdlib"])
    docs, seen = [], set()
    for path in sorted(lib.glob("*.py")) + sorted(lib.glob("*/*.py")):
        rel = str(path.relative_to(lib))
        if rel.startswith(SKIP):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef))]:
            text = "\n\n".join(prose_paragraphs(ast.get_docstring(node) or ""))
            if len(text.split()) < 60 or text in seen:
                continue
            if any(s.strip() in hay_sents for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 6):
                continue
            seen.add(text)
            docs.append({"id": rel + ("" if node is tree else ":" + node.name), "text": text})
    with open(out / "heldout_python_docstrings.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    print(f"haystack: {len(paras)} paragraphs, {len(hay.split())} words; held-out: {len(docs)} documents -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

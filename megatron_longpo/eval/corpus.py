"""The raw material of RULER's tasks, each with its provenance: the essay haystack, the QA sets and the
held-out perplexity documents.

RULER downloads Paul Graham's essays and the SQuAD / HotpotQA dev sets with its own scripts
(`scripts/data/synthetic/json/download_*`). Here a user passes those files (`--haystack-file
PaulGrahamEssays.json`, `--qa-file squad=squad.json --qa-file hotpotqa=hotpotqa.json`); without them
the offline defaults below are used, and every result names which one it used:

- haystack: `data/haystack_python_reference.txt`, the prose paragraphs (no code, grammar or tables)
  of the Python Language Reference as CPython ships it (`pydoc_data/topics.py`, Python 3.12;
  licence PSF-2.0). 536 paragraphs, 25,880 words (about 33K SmolLM2 tokens: a 16K haystack is not a
  loop). Not the training documents (megatron_longpo/resources/documents) and not the perplexity set.
- perplexity: `data/heldout_python_docstrings.jsonl`, 415 docstrings of the Python 3.12 standard
  library (prose paragraphs only, >= 60 words each; licence PSF-2.0), none sharing a sentence with
  the haystack. Used by nothing else.
- QA (no real QA set ships in an installable package): a documented stand-in with RULER's structure
  -- a gold paragraph among distractor paragraphs, "Document i:" blocks, one short answer -- built
  from the haystack paragraphs as cloze questions ("which word fills the blank in this sentence from
  the documents?"). It tests finding one passage among many, not reading comprehension; its rows
  are marked `qa_1 (stand-in)` / `qa_2 (stand-in)` in the tables.

`tools/make_eval_corpus.py` rebuilds the two data files from a Python's standard library (the same
bytes with Python 3.12.1).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from random import Random
from megatron_longpo.resources import DOCUMENTS

DATA = Path(__file__).resolve().parent / "data"
DEFAULT_HAYSTACK = DATA / "haystack_python_reference.txt"
DEFAULT_HELDOUT = DATA / "heldout_python_docstrings.jsonl"
TRAINING_DOCUMENTS = DOCUMENTS  # the generation example's documents (megatron_longpo/resources)
PSF = "PSF-2.0 (Python Software Foundation License)"


class CorpusError(ValueError):
    """A user-given haystack or QA file is missing or not in the format RULER's scripts write."""


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class Haystack:
    text: str
    source: str
    licence: str
    path: str

    @property
    def words(self) -> list[str]:
        """RULER's essay haystack: the text's words, whitespace collapsed (`re.sub(r'\\s+', ' ', ...)`)."""
        return _words(self.text)

    def provenance(self) -> dict:
        return {"source": self.source, "licence": self.licence, "path": self.path, "words": len(self.words),
                "sha256": _sha(self.text)}


@lru_cache(maxsize=4)
def _words(text: str) -> list[str]:
    return re.sub(r"\s+", " ", text).strip().split(" ")


def load_haystack(path: str | Path | None = None) -> Haystack:
    """RULER's `PaulGrahamEssays.json` ({"text": ...}) or any plain-text file; None: the offline default."""
    if path is None:
        return Haystack(DEFAULT_HAYSTACK.read_text(encoding="utf-8"), "Python 3.12 Language Reference prose "
                        "(CPython pydoc_data/topics.py)", PSF, str(DEFAULT_HAYSTACK))
    p = Path(path)
    if not p.is_file():
        raise CorpusError(f"--haystack-file {path}: no such file (RULER's download_paulgraham_essay.py writes "
                          f"PaulGrahamEssays.json)")
    raw = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            text = json.loads(raw)["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CorpusError(f"--haystack-file {path}: expected RULER's {{\"text\": ...}} JSON ({e})") from None
    else:
        text = raw
    if len(text.split()) < 1000:
        raise CorpusError(f"--haystack-file {path}: only {len(text.split())} words; give at least 1,000")
    return Haystack(text, f"user file {p.name}", "as given by the user", str(p))


# ---------------------------------------------------------------- QA sets


@dataclass
class QASet:
    """RULER's qa.py data: questions (query, outputs, context doc ids, more_context doc ids) and docs."""
    name: str
    qas: list[dict]
    docs: list[str]
    source: str
    licence: str
    standin: bool = False
    extra: dict = field(default_factory=dict)

    def provenance(self) -> dict:
        return {"name": self.name, "source": self.source, "licence": self.licence, "stand_in": self.standin,
                "questions": len(self.qas), "documents": len(self.docs),
                "sha256": _sha("\n".join(self.docs) + json.dumps([q["query"] for q in self.qas]))}


def read_squad(path: str | Path) -> QASet:
    """SQuAD v2 dev JSON as RULER reads it (`read_squad`): answerable questions; the other paragraphs of
    the same article are the first distractors."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = []
    for d in data["data"]:
        more = [index[p["context"]] for p in d["paragraphs"]]
        for p in d["paragraphs"]:
            for q in p["qas"]:
                if not q.get("is_impossible", False):
                    qas.append({"query": q["question"], "outputs": [a["text"] for a in q["answers"]],
                                "context": [index[p["context"]]],
                                "more_context": [i for i in more if i != index[p["context"]]]})
    return QASet("squad", qas, docs, f"user file {Path(path).name} (SQuAD)", "CC BY-SA 4.0 (SQuAD)")


def read_hotpotqa(path: str | Path) -> QASet:
    """HotpotQA dev (distractor) JSON as RULER reads it (`read_hotpotqa`)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = [{"query": d["question"], "outputs": [d["answer"]],
            "context": [index[f"{t}\n{''.join(p)}"] for t, p in d["context"]]} for d in data]
    return QASet("hotpotqa", qas, docs, f"user file {Path(path).name} (HotpotQA)", "CC BY-SA 4.0 (HotpotQA)")


def load_qa_file(name: str, path: str | Path) -> QASet:
    readers = {"squad": read_squad, "hotpotqa": read_hotpotqa}
    if name not in readers:
        raise CorpusError(f"--qa-file {name}={path}: the name must be squad (qa_1) or hotpotqa (qa_2)")
    if not Path(path).is_file():
        raise CorpusError(f"--qa-file {name}={path}: no such file (RULER's download_qa_dataset.sh writes it)")
    try:
        return readers[name](path)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CorpusError(f"--qa-file {name}={path}: not the {name} dev JSON RULER downloads ({e!r})") from None


STOP = set("""about above after again against along also among another because been before being below between
both cannot could does doing done during each either every first from further have having here however into
itself just least less many might more most much must neither never none only other otherwise over rather same
should since some still such than that their them then there these they this those through thus under until
upon very what when where whether which while will with within without would your""".split())  # noqa: SIM905


def _sentences(paragraph: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"(])", paragraph) if s]


@lru_cache(maxsize=2)
def standin_qa(haystack_path: str = str(DEFAULT_HAYSTACK), per_paragraph: int = 2) -> QASet:
    """Cloze questions over the offline prose paragraphs: the blanked word (alphabetic, >= 5 letters, not
    a function word) occurs once in its sentence, and the sentence (>= 10 words) occurs once in the
    corpus, so the gold paragraph is the only document that answers it. Deterministic."""
    text = Path(haystack_path).read_text(encoding="utf-8")
    docs = [p.strip() for p in text.split("\n\n") if p.strip()]
    sent_count: dict[str, int] = {}
    for d in docs:
        for s in _sentences(d):
            sent_count[s] = sent_count.get(s, 0) + 1
    qas = []
    for i, d in enumerate(docs):
        rng = Random(f"standin:{i}")
        cands = [s for s in _sentences(d) if len(s.split()) >= 10 and sent_count[s] == 1]
        rng.shuffle(cands)
        made = 0
        for s in cands:
            words = re.findall(r"\b[A-Za-z]{5,}\b", s)
            words = [w for w in words if w.lower() not in STOP and len(re.findall(rf"\b{w}\b", s)) == 1]
            if not words:
                continue
            w = rng.choice(words)
            blanked = re.sub(rf"\b{w}\b", "_____", s, count=1)
            qas.append({"query": f'Which word fills the blank in this sentence from the documents: "{blanked}"',
                        "outputs": [w], "context": [i], "more_context": []})
            made += 1
            if made == per_paragraph:
                break
    return QASet("standin", qas, docs, "cloze stand-in over the haystack prose (Python 3.12 Language "
                 "Reference)", PSF, standin=True)


# ---------------------------------------------------------------- held-out perplexity documents


def load_heldout(path: str | Path = DEFAULT_HELDOUT) -> tuple[list[str], dict]:
    p = Path(path)
    if not p.is_file():
        raise CorpusError(f"--perplexity-file {path}: no such file (JSON lines with a 'text' field)")
    docs = [json.loads(line)["text"] for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    prov = {"source": "Python 3.12 standard-library docstrings (prose paragraphs, >= 60 words)"
            if p == DEFAULT_HELDOUT else f"user file {p.name}", "licence": PSF if p == DEFAULT_HELDOUT else "user",
            "documents": len(docs), "words": sum(len(d.split()) for d in docs), "sha256": _sha("\n".join(docs))}
    return docs, prov


def shared_sentences(a: str, b: str, min_words: int = 8) -> set[str]:
    """Sentences of >= min_words words that occur in both texts (a provenance check)."""
    def sents(t: str) -> set[str]:
        return {" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", t) if len(s.split()) >= min_words}
    return sents(a) & sents(b)

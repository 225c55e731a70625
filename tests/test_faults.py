"""Bad input and faults (issue 22, docs/reliability.md): nothing is lost, nothing trains silently
wrong, a user's mistake gets one clear line and a documented exit code.

Fast tests use synthetic dist_checkpointing directories (test_export.py) and the SmolLM2
tokenizer; the `slow` ones run the trainer and the reference tool under torchrun on the CPU."""
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from megatron_longpo.checkpoint import dist as ckpt
from megatron_longpo.launch import run_torchrun
from mp import WORKERS
from test_export import cli_main, synthetic

ROOT = Path(__file__).resolve().parents[1]


def tree(d: Path) -> dict:
    """Every file under d with its bytes: what must survive a refused command unchanged."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def one_error_line(err: str, match: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------- --overwrite never deletes the input


def test_export_overwrite_refuses_an_out_that_contains_the_checkpoint(tmp_path, capsys):
    """The probe's data loss: --out P --overwrite with the checkpoint at P/ck deleted P/ck and
    everything else in P, and exited 0."""
    parent = tmp_path / "P"
    parent.mkdir()
    d, _, _ = synthetic(parent)  # parent/ckpt-...
    (parent / "notes.txt").write_text("mine")
    before = tree(parent)
    for out in (parent, tmp_path):  # the parent, and the parent's parent
        rc, _, err = cli_main(capsys, "megatron-to-hf", "--megatron-dir", d, "--out", out, "--overwrite")
        assert rc == 2
        one_error_line(err, "contains the input")
        assert tree(parent) == before
    rc, _, err = cli_main(capsys, "megatron-to-hf", "--megatron-dir", d, "--out", d, "--overwrite")
    assert rc == 2 and "is inside the checkpoint directory" in err and tree(parent) == before
    rc, _, err = cli_main(capsys, "reshard", "--megatron-dir", d, "--out", parent, "--overwrite")
    assert rc == 2 and "contains the input" in err and tree(parent) == before


def test_export_overwrite_replaces_only_its_own_earlier_output(tmp_path, capsys):
    d, _, _ = synthetic(tmp_path)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"not ours")
    rc, _, err = cli_main(capsys, "megatron-to-hf", "--megatron-dir", d, "--out", foreign, "--overwrite")
    assert rc == 2
    one_error_line(err, "was not written by megatron-to-hf")
    assert (foreign / "model.safetensors").read_bytes() == b"not ours"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    rc, _, err = cli_main(capsys, "megatron-to-hf", "--megatron-dir", d, "--out", a_file, "--overwrite")
    assert rc == 2 and "is a file" in err and a_file.read_text() == "x"

    out = tmp_path / "hf"
    assert cli_main(capsys, "megatron-to-hf", "--megatron-dir", d, "--out", out)[0] == 0
    first = tree(out)
    rc, _, err = cli_main(capsys, "megatron-to-hf", "--megatron-dir", d, "--out", out)
    assert rc == 2 and "pass --overwrite" in err
    assert cli_main(capsys, "megatron-to-hf", "--megatron-dir", d, "--out", out, "--overwrite")[0] == 0
    assert tree(out) == first  # the same export again, nothing left behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]  # no temporary sibling left
    (out / "my_eval_results.json").write_text("{}")  # the user added a file: no longer only ours
    rc, _, err = cli_main(capsys, "megatron-to-hf", "--megatron-dir", d, "--out", out, "--overwrite")
    assert rc == 2 and "holds files this tool did not write (my_eval_results.json)" in err
    assert (out / "my_eval_results.json").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_export_to_an_unwritable_place_is_refused_before_work(tmp_path, capsys):
    d, _, _ = synthetic(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, _, err = cli_main(capsys, "megatron-to-hf", "--megatron-dir", d, "--out", ro / "hf")
        assert rc == 2 and "is not writable" in err
    finally:
        ro.chmod(0o755)


# ---------------------------------------------------------------- checksums


def _distcp(it: Path) -> Path:
    return sorted(it.glob("*.distcp"))[0]


def test_damaged_checkpoint_file_is_named_by_export(tmp_path, capsys):
    d, _, _ = synthetic(tmp_path)
    it = ckpt.latest_iteration_dir(d)
    ckpt.write_checksums(it)
    assert ckpt.verify_checksums(it) is True
    f = _distcp(it)
    data = bytearray(f.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # same size, other contents
    f.write_bytes(bytes(data))
    rc, _, err = cli_main(capsys, "megatron-to-hf", "--megatron-dir", d, "--out", tmp_path / "hf")
    assert rc == 2
    one_error_line(err, f"{f} does not match its sha256 in checksums.json")
    assert not (tmp_path / "hf").exists()
    with open(f, "r+b") as fh:  # truncated
        fh.truncate(len(data) // 3)
    rc, _, err = cli_main(capsys, "megatron-to-hf", "--megatron-dir", d, "--out", tmp_path / "hf")
    assert rc == 2
    one_error_line(err, f"{f} has {len(data) // 3} bytes, {len(data)} were written")


def test_checkpoint_without_checksums_still_exports(tmp_path, capsys):
    """Iterations saved before checksums existed: loaded unverified (verify_checksums -> False)."""
    d, _, _ = synthetic(tmp_path)
    assert ckpt.verify_checksums(ckpt.latest_iteration_dir(d)) is False
    assert cli_main(capsys, "megatron-to-hf", "--megatron-dir", d, "--out", tmp_path / "hf")[0] == 0


# ---------------------------------------------------------------- tokenizer identity


def _variant_tokenizer(smollm2_dir: Path, out: Path, *, swap=False, add_token=False, template=None, edit=None) -> Path:
    """A copy of the SmolLM2 tokenizer: two vocabulary entries swapped (same size, other ids), one
    added token (other size), another chat template, or `edit(tokenizer_json)` applied."""
    out.mkdir(parents=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (smollm2_dir / f).is_file():
            shutil.copy(smollm2_dir / f, out / f)
    tj = json.loads((out / "tokenizer.json").read_text())
    if swap:
        vocab = tj["model"]["vocab"]
        inv = {v: k for k, v in vocab.items()}
        a, b = inv[1000], inv[2000]
        vocab[a], vocab[b] = 2000, 1000
    if add_token:
        tj["added_tokens"].append({"id": len(tj["model"]["vocab"]), "content": "<|extra|>", "single_word": False,
                                   "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    if edit is not None:
        edit(tj)
    (out / "tokenizer.json").write_text(json.dumps(tj))
    if template is not None:
        (out / "chat_template.jinja").write_text(template)
    return out


def _manifest(tok_dir: Path) -> dict:
    from megatron_longpo.data.tokenizer import HFChatTokenizer

    t = HFChatTokenizer(tok_dir)
    return {"tokenizer": t.describe(), "chat_template": t.chat_template}


def test_dataset_tokenizer_is_checked_against_the_models(smollm2_dir, tmp_path):
    from megatron_longpo.data.tokenizer import TokenizerMismatch, check_dataset_tokenizer

    def check(manifest, model_tok, vocab=49152):
        return check_dataset_tokenizer(manifest, "DATA", vocab, "MODEL", model_tok, skip_key="data.check_tokenizer=false")

    same = _manifest(smollm2_dir)
    assert check(same, smollm2_dir) == []
    swapped = _variant_tokenizer(smollm2_dir, tmp_path / "swapped", swap=True)
    with pytest.raises(TokenizerMismatch, match=r"both have 49152 tokens, but the tokenizers differ \(in vocabulary; the same: merges,"):
        check(same, swapped)
    with pytest.raises(TokenizerMismatch, match="data.check_tokenizer=false skips this check"):
        check(_manifest(swapped), smollm2_dir)
    bigger = _variant_tokenizer(smollm2_dir, tmp_path / "bigger", add_token=True)
    with pytest.raises(TokenizerMismatch, match=r"\(49153 tokens\), but the model MODEL has 49152 token embeddings"):
        check(_manifest(bigger), smollm2_dir)
    with pytest.raises(TokenizerMismatch, match=r"\(49152 tokens\), the model MODEL uses 'bigger' \(49153 tokens\)"):
        check(same, bigger, vocab=49216)
    other_template = _variant_tokenizer(smollm2_dir, tmp_path / "tmpl", template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(TokenizerMismatch, match="another chat template"):
        check(same, other_template)
    # an old manifest (no hash): the vocabulary size is checked, and the note says what was not
    old = {"tokenizer": {k: v for k, v in same["tokenizer"].items() if k != "hash"}, "chat_template": same["chat_template"]}
    assert "older manifest without the tokenizer's hash" in check(old, swapped)[0]
    with pytest.raises(TokenizerMismatch, match="49152 tokens"):
        check(old, bigger, vocab=49216)
    # a checkpoint without a tokenizer copy: only the size
    assert "keeps no tokenizer copy" in check(same, tmp_path / "none")[0]


def _as_transformers_5_17_converts_the_gguf(tj):
    """What transformers 5.17 writes for SmolLM2's GGUF file where 5.24 writes the form the embedded
    model has here (seen on the GPU machine: the same vocabulary, merges and added tokens)."""
    tj["model"].update(byte_fallback=True, fuse_unk=True, unk_token="<|endoftext|>")
    tj["normalizer"] = {"type": "Sequence", "normalizers": []}
    tj["pre_tokenizer"]["trim_offsets"] = False
    tj["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"},
                                                       {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                                                       tj["decoder"]]}


def test_tokenizer_mismatch_names_the_parts_that_differ(smollm2_dir, tmp_path):
    """Another converter's form of the same vocabulary is still refused (with byte_fallback and an
    unk token, six control bytes become <|endoftext|> instead of nothing: other ids), and the
    message says what differs; a difference in decoding alone does not change the ids and is a note."""
    from tokenizers import Tokenizer

    from megatron_longpo.data.tokenizer import TokenizerMismatch, check_dataset_tokenizer

    def check(manifest, model_tok):
        return check_dataset_tokenizer(manifest, "DATA", 49152, "MODEL", model_tok, skip_key="skip")

    same = _manifest(smollm2_dir)
    other = _variant_tokenizer(smollm2_dir, tmp_path / "v517", edit=_as_transformers_5_17_converts_the_gguf)
    a, b = (Tokenizer.from_file(str(d / "tokenizer.json")) for d in (smollm2_dir, other))
    assert a.encode("a\x04b").ids != b.encode("a\x04b").ids and a.encode("plain text").ids == b.encode("plain text").ids
    with pytest.raises(TokenizerMismatch, match=r"differ \(in decoder, model options, normalizer, pre_tokenizer; the same: "
                                                r"vocabulary, merges, added tokens, post_processor; the same vocabulary "
                                                r"converted differently"):
        check(same, other)
    no_parts = {**same, "tokenizer": {k: v for k, v in same["tokenizer"].items() if k != "hash_parts"}}  # older manifest
    with pytest.raises(TokenizerMismatch, match=r"differ \(tokens, merges, normaliser or special tokens; hash"):
        check(no_parts, other)
    decoder_only = _variant_tokenizer(smollm2_dir, tmp_path / "dec", edit=lambda tj: tj.update(decoder=None))
    notes = check(same, decoder_only)
    assert len(notes) == 1 and "differ only in decoder" in notes[0], notes


def test_tokenizer_directory_that_does_not_exist(tmp_path):
    from megatron_longpo.data.tokenizer import HFChatTokenizer, TokenizerError

    with pytest.raises(TokenizerError, match="tokenizer directory '/nonexistent/tok' does not exist"):
        HFChatTokenizer("/nonexistent/tok")


@pytest.mark.parametrize("flag", ["--chunk-size", "--samples-per-microbatch", "--tp", "--pp", "--cp"])
def test_reference_tool_refuses_zero_sizes_before_any_work(flag, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("precompute_cli", ROOT / "tools/precompute_ref_logps.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--data", "/nonexistent", "--model", "/nonexistent", flag, "0"]) == 2
    one_error_line(capsys.readouterr().err, f"{flag} must be at least 1, got 0")


def test_save_dir_that_cannot_hold_the_run(tmp_path):
    from megatron_longpo.training.resume import ResumeConfigError, check_save_dir

    (tmp_path / "f").write_text("x")
    with pytest.raises(ResumeConfigError, match="is a file, not a directory"):
        check_save_dir(str(tmp_path / "f"), "ckpt")
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ResumeConfigError, match="is model.checkpoint"):
        check_save_dir(str(tmp_path / "ckpt") + "/", str(tmp_path / "ckpt"))
    check_save_dir(str(tmp_path / "new" / "run"), str(tmp_path / "ckpt"))
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(ResumeConfigError, match="is not writable"):
            check_save_dir(str(tmp_path / "ro" / "run"), str(tmp_path / "ckpt"))


def test_resume_key_table():
    """Every refused key is named with both values; schedule and optimizer keys are sorted apart."""
    from megatron_longpo.config import load_config, to_dict
    from megatron_longpo.training.resume import ResumeConfigError, compare

    old = to_dict(load_config(None, ["train.steps=2", "data.path=/d", "model.checkpoint=/m"]))
    got = compare(old, to_dict(load_config(None, ["train.steps=4", "optim.lr=1e-6", "optim.adam_beta2=0.99", "loss.beta=0.2",
                                                  "data.path=/d", "model.checkpoint=/m"])), save_dir="S")
    assert [k for k, _, _ in got["schedule"]] == ["optim.lr", "train.steps"]
    assert [k for k, _, _ in got["reapply"]] == ["optim.adam_beta2"] and [k for k, _, _ in got["free"]] == ["loss.beta"]
    for over, msg in [("model.rope_theta=1e6", "model.rope_theta was None, now 1000000.0"),
                      ("data.global_batch_size=4", "data.global_batch_size was 8, now 4"),
                      ("model.checkpoint=/other", "model.checkpoint was '/m', now '/other'")]:
        new = to_dict(load_config(None, ["train.steps=2", "data.path=/d", "model.checkpoint=/m", over]))
        with pytest.raises(ResumeConfigError, match=re.escape(msg)):
            compare(old, new, save_dir="S")
    moved = to_dict(load_config(None, ["train.steps=2", "data.path=/moved", "model.checkpoint=/m"]))
    assert compare(old, moved, save_dir="S", same_dataset=True)["free"] == [("data.path", "/d", "/moved")]
    with pytest.raises(ResumeConfigError, match="data.path was '/d', now '/moved'"):
        compare(old, moved, save_dir="S", same_dataset=False)


# ---------------------------------------------------------------- the trainer (torchrun, CPU)

BASE = {"train.tensorboard": "false", "data.global_batch_size": 2, "data.samples_per_microbatch": 1,
        "optim.name": "adam", "optim.lr": 1e-3, "optim.warmup_fraction": 0, "loss.name": "longpo",
        "loss.longpo_lambda": 1.0, "loss.beta": 0.5}


def train(ckpt_dir, data, save_dir, timeout=300, **kw):
    """(exit code, output, summary or None) of one torchrun training process."""
    args = [f"{k}={v}" for k, v in {**BASE, "model.checkpoint": ckpt_dir, "data.path": data, "train.save_dir": save_dir,
                                     **kw}.items()]
    code, out, timed_out = run_torchrun(1, [WORKERS / "train.py", *args], timeout=timeout,
                                        env={"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert not timed_out, out[-3000:]
    s = Path(save_dir) / "summary.json"
    return code, out, json.loads(s.read_text()) if code == 0 and s.is_file() else None


def error_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith("error: ")]


def worker_failed(code: int, out: str, exitcode: int = 2) -> str:
    """The worker exited with `exitcode` (torchrun itself exits 1 and adds its own report, with a
    launcher traceback, after the worker's output), printed one error line and no traceback.
    Returns that line."""
    assert code != 0 and re.search(rf"exitcode\s*:\s*{exitcode}\b", out), out[-3000:]
    worker = out.split("torch/distributed/elastic/multiprocessing/api.py")[0]
    assert "Traceback" not in worker, worker[-3000:]
    lines = error_lines(worker)
    assert len(lines) == 1, worker[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def two_step_run(tiny_llama_ckpt, tiny_longpo_data, module_tmp):
    """A finished 2-step run saved at steps 1 and 2 (one trainer process); each test resumes a copy."""
    run = module_tmp / "two_steps"
    code, out, _ = train(tiny_llama_ckpt, tiny_longpo_data, run, **{"train.steps": 2, "train.save_interval": 1})
    assert code == 0, out[-3000:]
    return run


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.mark.slow
def test_resume_with_more_steps_continues_the_schedule(two_step_run, tiny_llama_ckpt, tiny_longpo_data, tmp_path):
    """The probe: 2 steps, then the same save_dir with train.steps=4 ran steps 3-4 at lr 0."""
    from fixtures import read_model_tensors

    run = copy_of(two_step_run, tmp_path)
    code, out, s = train(tiny_llama_ckpt, tiny_longpo_data, run, **{"train.steps": 4})
    assert code == 0, out[-3000:]
    assert "resume: train.steps 2 -> 4: the learning-rate schedule is rebuilt for 4 steps" in out, out[-3000:]
    lrs = [st["lr"] for st in s["steps"]]
    assert [st["step"] for st in s["steps"]] == [3, 4] and all(lr > 1e-5 for lr in lrs), lrs
    a, b = read_model_tensors(run / "iter_0000002"), read_model_tensors(run / "iter_0000004")
    assert any(not (a[k] == b[k]).all() for k in a), "steps 3-4 did not change the weights"
    # asking for fewer steps than the run has done is an error, not a silent re-save
    code, out, _ = train(tiny_llama_ckpt, tiny_longpo_data, run, **{"train.steps": 3})
    assert "already at step 4, beyond the 3 steps" in worker_failed(code, out)
    assert (run / "latest").read_text().strip() == "iter_0000004"


@pytest.mark.slow
def test_resume_refuses_keys_whose_change_would_be_wrong(two_step_run, tiny_llama_ckpt, tiny_longpo_data, tmp_path):
    run = copy_of(two_step_run, tmp_path)
    before = tree(run)
    code, out, _ = train(tiny_llama_ckpt, tiny_longpo_data, run, **{"train.steps": 3, "optim.name": "sgd", "loss.name": "dpo",
                                                                     "data.seed": 9})
    line = worker_failed(code, out)
    for key in ("data.seed was 1234, now 9", "loss.name was 'longpo', now 'dpo'", "optim.name was 'adam', now 'sgd'",
                "Set them back (data.seed=1234 loss.name=longpo optim.name=adam)"):
        assert key in line, line
    assert tree(run) == before
    # a save_dir that holds a model (an import), not a training run
    imported = tmp_path / "imported"
    shutil.copytree(tiny_llama_ckpt, imported)
    code, out, _ = train(tiny_llama_ckpt, tiny_longpo_data, imported, **{"train.steps": 1})
    assert "holds a checkpoint without training state" in worker_failed(code, out)


@pytest.mark.slow
def test_damaged_checkpoint_is_named_and_fallback_only_when_asked(two_step_run, tiny_llama_ckpt, tiny_longpo_data, tmp_path):
    """The probe: 4 MiB overwritten inside a .distcp loaded silently, the next step was NaN and the
    run saved again from the corrupt state; a truncated one gave an 80-line traceback."""
    run = copy_of(two_step_run, tmp_path)
    f = _distcp(run / "iter_0000002")
    data = bytearray(f.read_bytes())
    n = min(4 << 20, len(data) // 2)
    data[len(data) // 4: len(data) // 4 + n] = os.urandom(n)
    f.write_bytes(bytes(data))
    before = tree(run)
    code, out, _ = train(tiny_llama_ckpt, tiny_longpo_data, run, **{"train.steps": 3})
    line = worker_failed(code, out)
    assert f"{f} does not match its sha256" in line and "train.resume_fallback=true" in line and "iter_0000001" in line, line
    assert tree(run) == before  # nothing saved from the damaged state
    with open(f, "r+b") as fh:
        fh.truncate(1000)
    code, out, _ = train(tiny_llama_ckpt, tiny_longpo_data, run, **{"train.steps": 3})
    assert f"{f} has 1000 bytes" in worker_failed(code, out)
    code, out, s = train(tiny_llama_ckpt, tiny_longpo_data, run, **{"train.steps": 3, "train.resume_fallback": "true"})
    assert code == 0, out[-3000:]
    assert "train.resume_fallback=true: resuming from iter_0000001 instead of the damaged iter_0000002" in out
    assert [st["step"] for st in s["steps"]] == [2, 3] and all(st["skipped"] is False for st in s["steps"])
    assert ckpt.verify_checksums(run / "iter_0000003") is True


@pytest.mark.slow
def test_dataset_of_another_tokenizer_is_refused_by_trainer_and_reference_tool(tiny_llama_ckpt, smollm2_dir, tmp_path):
    """The probe: a dataset tokenized with another tokenizer (ids in range) trained and scored
    with exit 0. Here: the SmolLM2 tokenizer with two vocabulary entries swapped."""
    from fixtures import build_dataset

    swapped = _variant_tokenizer(smollm2_dir, tmp_path / "swapped_tok", swap=True)
    (tmp_path / "data").mkdir()
    data = build_dataset(tmp_path / "data", "longpo", 4, swapped, None)
    code, out, timed_out = run_torchrun(1, [ROOT / "tools/precompute_ref_logps.py", "--data", data, "--model", tiny_llama_ckpt],
                                        timeout=300, env={"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    line = worker_failed(code, out)
    assert "tokenizers differ" in line and str(data) in line and str(tiny_llama_ckpt) in line and "--no-tokenizer-check" in line
    assert not Path(f"{data}.ref.safetensors").exists()
    code, out, _ = train(tiny_llama_ckpt, data, tmp_path / "run", **{"train.steps": 1, "loss.name": "sft"})
    line = worker_failed(code, out)
    assert "tokenizers differ" in line and "data.check_tokenizer=false" in line, line
    assert not (tmp_path / "run" / "latest").exists()

"""Megatron -> Hugging Face export and resharding (issue 6), on the CPU.

Fast tests use dist_checkpointing-format directories written directly with
torch.distributed.checkpoint (no megatron); the slow ones go through the real importer
(megatron model + dist_checkpointing.save), torchrun layouts and transformers.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fixtures import run_captured
from mp import torchrun

from megatron_longpo.checkpoint import dist as ckpt
from megatron_longpo.checkpoint.dist_reader import DistCheckpointReader, megatron_shapes
from megatron_longpo.checkpoint.export import megatron_to_hf_checkpoint
from megatron_longpo.checkpoint.safetensors_writer import StreamingSafetensorsWriter, parse_size
from megatron_longpo.checkpoint.hf import hf_names, hf_to_megatron
from megatron_longpo.checkpoint.hf_files import HFWeights
from megatron_longpo.models.hf_config import arch_from_hf_config

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "tools" / "convert_checkpoint.py"
WORKERS = Path(__file__).parent / "workers"


def _load_cli():
    spec = importlib.util.spec_from_file_location("convert_checkpoint_cli", CLI)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cli_main(capsys, *argv):
    rc = _load_cli().main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def cli(*argv, timeout=600):
    return run_captured([sys.executable, str(CLI), *map(str, argv)], timeout=timeout,
                        env={**os.environ, "PYTHONWARNINGS": "ignore"})


def assert_same_weights(hf_dir_a, hf_dir_b):
    a, b = HFWeights(hf_dir_a), HFWeights(hf_dir_b)
    assert sorted(a.names()) == sorted(b.names())
    for n in a.names():
        x, y = a.get(n), b.get(n)
        assert x.dtype == y.dtype and torch.equal(x, y), n


# --------------------------------------------------------------------------------------------
# Synthetic checkpoints (the dist_checkpointing layout, written without megatron)
# --------------------------------------------------------------------------------------------

BASE = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6, max_position_embeddings=128,
            rms_norm_eps=1e-6, rope_theta=10000.0)
CONFIGS = {
    "llama-gqa-untied-padded": dict(model_type="llama", vocab_size=1000, num_key_value_heads=2, tie_word_embeddings=False),
    "mistral-mqa-untied": dict(model_type="mistral", vocab_size=1024, num_key_value_heads=1, tie_word_embeddings=False,
                               sliding_window=None),
    "qwen2-bias-tied-padded": dict(model_type="qwen2", vocab_size=1001, num_key_value_heads=3, tie_word_embeddings=True),
}


def random_hf_state(arch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(_hf_meta(arch, n).shape, generator=g) for n in hf_names(arch)}


def _hf_meta(arch, name):
    d, H, F = arch.head_dim, arch.hidden_size, arch.ffn_hidden_size
    nq, nkv = arch.num_attention_heads * d, arch.num_query_groups * d
    table = {"q_proj.weight": (nq, H), "k_proj.weight": (nkv, H), "v_proj.weight": (nkv, H), "o_proj.weight": (H, nq),
             "q_proj.bias": (nq,), "k_proj.bias": (nkv,), "v_proj.bias": (nkv,), "gate_proj.weight": (F, H),
             "up_proj.weight": (F, H), "down_proj.weight": (H, F), "layernorm.weight": (H,), "norm.weight": (H,),
             "embed_tokens.weight": (arch.vocab_size, H), "lm_head.weight": (arch.vocab_size, H)}
    return torch.empty(next(v for k, v in table.items() if name.endswith(k)), device="meta")


def write_dist_checkpoint(ckpt_dir, arch, hf_state, hf_config, iteration=3, extra=None):
    """What hf-to-megatron + a training save produce: stacked layers, model.json, latest, plus an
    optimizer tensor that export must ignore."""
    import torch.distributed.checkpoint as dcp

    mcore = dict(hf_to_megatron(arch, hf_state.__getitem__))
    state = {}
    for key in megatron_shapes(arch):
        if key.startswith("decoder.layers."):
            rest = key.removeprefix("decoder.layers.")
            state[key] = torch.stack([mcore[f"decoder.layers.{i}.{rest}"] for i in range(arch.num_layers)])
        else:
            state[key] = mcore[key]
    state["optimizer.state.exp_avg.decoder.layers.mlp.linear_fc1.weight"] = torch.ones(arch.num_layers, 7)
    state.update(extra or {})
    it = Path(ckpt_dir) / ckpt.iter_name(iteration)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(it)), no_dist=True)
    (it / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
    (Path(ckpt_dir) / "latest").write_text(it.name + "\n")
    ckpt.write_model_json(ckpt_dir, arch, hf_config)
    return it


def synthetic(tmp_path, name="llama-gqa-untied-padded", **extra):
    cfg = {**BASE, **CONFIGS[name]}
    arch = arch_from_hf_config(cfg)
    hf = random_hf_state(arch)
    d = tmp_path / f"ckpt-{name}"
    write_dist_checkpoint(d, arch, hf, cfg, **extra)
    return d, arch, hf


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size("123") == 123
    assert parse_size("1.5kb") == 1500
    with pytest.raises(ValueError, match="cannot read the size"):
        parse_size("two gigs")


def test_streaming_writer_shards_in_any_order(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(10 + i, 7, generator=g) for i in range(6)}
    tensors["empty"] = torch.zeros(0, 3)
    plan = [(n, tuple(t.shape)) for n, t in tensors.items()]
    for dtype, shard in [(torch.float32, 700), (torch.bfloat16, 10**6)]:
        out = tmp_path / str(dtype)
        w = StreamingSafetensorsWriter(out, plan, dtype, max_shard_bytes=shard)
        for n in reversed(list(tensors)):
            w.add(n, tensors[n])
        w.close()
        many = len(w.files) > 1
        assert many == (shard == 700) and (out / "model.safetensors.index.json").is_file() == many
        back = HFWeights(out)
        assert sorted(back.names()) == sorted(tensors)
        for n, t in tensors.items():
            assert torch.equal(back.get(n), t.to(dtype)), n


@pytest.mark.parametrize("name", list(CONFIGS))
def test_synthetic_checkpoint_exports_bit_exact(name, tmp_path):
    d, arch, hf = synthetic(tmp_path, name)
    r = megatron_to_hf_checkpoint(d, tmp_path / "hf", max_shard_bytes=200_000)
    assert r["shards"] > 1  # the index path
    w = HFWeights(tmp_path / "hf")
    assert sorted(w.names()) == sorted(hf)
    for n, t in hf.items():
        assert torch.equal(w.get(n), t), n
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["vocab_size"] == arch.vocab_size and cfg["dtype"] == "float32"
    assert not list(tmp_path.glob(".hf.*"))  # the temporary directory was renamed


def test_reader_reads_layer_slices(tmp_path):
    d, arch, hf = synthetic(tmp_path)
    r = DistCheckpointReader(d / "iter_0000003")
    full = r.read("decoder.layers.mlp.linear_fc1.weight")
    assert full.shape == (3, 160, 48)
    assert torch.equal(r.read("decoder.layers.mlp.linear_fc1.weight", index=2), full[2])
    gate = hf["model.layers.2.mlp.gate_proj.weight"]
    assert torch.equal(full[2, :80], gate)


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    def fails(*argv, match):
        rc, _, err = cli_main(capsys, "megatron-to-hf", *argv)
        assert rc == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and match in lines[0], err
        return lines[0]

    empty = tmp_path / "empty"
    empty.mkdir()
    fails("--megatron-dir", empty, "--out", tmp_path / "o", match="is not a megatron-longpo checkpoint (no model.json)")
    fails("--megatron-dir", tmp_path / "nope", "--out", tmp_path / "o", match="does not exist")

    d, arch, hf = synthetic(tmp_path)
    # unfinished save: no `latest`, only a partial .iter_*.tmp
    unfinished = tmp_path / "unfinished"
    shutil.copytree(d, unfinished)
    (unfinished / "latest").unlink()
    os.replace(unfinished / "iter_0000003", unfinished / ".iter_0000003.tmp")
    fails("--megatron-dir", unfinished, "--out", tmp_path / "o", match="unfinished writes found: .iter_0000003.tmp")
    fails("--megatron-dir", unfinished, "--out", tmp_path / "o", "--iteration", 3, match="unfinished write of iteration 3")
    fails("--megatron-dir", d, "--out", tmp_path / "o", "--iteration", 9, match="has no iteration 9")
    # iter dir without metadata
    nometa = tmp_path / "nometa"
    shutil.copytree(d, nometa)
    (nometa / "iter_0000003" / ".metadata").unlink()
    fails("--megatron-dir", nometa, "--out", tmp_path / "o", match="has no dist_checkpointing metadata (.metadata is missing)")
    # architectures it cannot export
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(d, gpt2)
    meta = json.loads((gpt2 / "model.json").read_text())
    meta["arch"]["architecture"] = "gpt2"
    (gpt2 / "model.json").write_text(json.dumps(meta))
    fails("--megatron-dir", gpt2, "--out", tmp_path / "o", match="cannot export architecture 'gpt2'")
    moe, _, _ = synthetic(tmp_path / "moe", extra={"decoder.layers.mlp.router.weight": torch.zeros(3, 4, 48)})
    fails("--megatron-dir", moe, "--out", tmp_path / "o", match="holds weights a llama model does not have (decoder.layers.mlp.router.weight)")
    wrong = tmp_path / "wrong"
    shutil.copytree(d, wrong)
    meta = json.loads((wrong / "model.json").read_text())
    meta["arch"]["ffn_hidden_size"] = 64
    (wrong / "model.json").write_text(json.dumps(meta))
    fails("--megatron-dir", wrong, "--out", tmp_path / "o", match="do not belong together")
    zarr = tmp_path / "zarr"
    shutil.copytree(d, zarr)
    (zarr / "iter_0000003" / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    fails("--megatron-dir", zarr, "--out", tmp_path / "o", match="backend 'zarr'; only 'torch_dist'")
    fails("--megatron-dir", d, "--out", d / "hf", match="is inside the checkpoint directory")
    # an existing output directory is not overwritten by accident
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    fails("--megatron-dir", d, "--out", tmp_path / "taken", match="already exists and is not empty")
    # reshard: a layout the model cannot take is refused before any process starts
    rc, _, err = cli_main(capsys, "reshard", "--megatron-dir", d, "--out", tmp_path / "r", "--tp", 4)
    assert rc == 2 and "6 attention heads are not divisible by TP=4" in err and len(err.strip().splitlines()) == 1
    rc, _, err = cli_main(capsys, "reshard", "--megatron-dir", unfinished, "--out", tmp_path / "r", "--tp", 2)
    assert rc == 2 and "no 'latest' marker" in err


def test_error_exit_code_of_the_real_process(tmp_path):
    r = cli("megatron-to-hf", "--megatron-dir", tmp_path, "--out", tmp_path / "o", timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ") and "no model.json" in r.stderr


# --------------------------------------------------------------------------------------------
# Through the real importer (megatron model + dist_checkpointing.save)
# --------------------------------------------------------------------------------------------

TINY = {
    # GQA, untied, vocabulary 49216 (padded to 49280), fp32
    "llama": dict(model_type="llama", vocab_size=49152 + 64, num_key_value_heads=2, tie_word_embeddings=False),
    # MQA, untied, no padding, bf16 weights (exported back as bf16: --dtype auto)
    "mistral": dict(model_type="mistral", vocab_size=49152, num_key_value_heads=1, tie_word_embeddings=False,
                    sliding_window=None, dtype="bfloat16"),
    # q/k/v biases, tied, padded vocabulary
    "qwen2": dict(model_type="qwen2", vocab_size=49152 + 64, num_key_value_heads=2, tie_word_embeddings=True),
}


def tiny_hf_model(root, smollm2_dir, name):
    from transformers import AutoConfig, AutoModelForCausalLM

    over = dict(TINY[name])
    dtype = getattr(torch, over.pop("dtype", "float32"))
    cfg = AutoConfig.for_model(over.pop("model_type"), hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                               num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6, **over)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # non-unit norms and non-zero biases so that their mapping is exercised
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.copy_(1 + 0.5 * torch.randn_like(p) if "norm" in n else 0.5 * torch.randn_like(p))
    d = root / f"{name}-hf"
    model.to(dtype).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (smollm2_dir / f).is_file():
            shutil.copy(smollm2_dir / f, d / f)
    return d


@pytest.fixture(scope="module")
def imported(smollm2_dir, module_tmp):
    """The tiny models and SmolLM2 imported by one process (one megatron import for all)."""
    root = module_tmp
    pairs = {name: (tiny_hf_model(root, smollm2_dir, name), root / f"{name}-ckpt") for name in TINY}
    pairs["smollm2"] = (Path(smollm2_dir), root / "smollm2-ckpt")
    out = run_captured([sys.executable, str(WORKERS / "convert_many.py"), *[str(p) for pair in pairs.values() for p in pair]],
                       timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-4000:]
    return pairs


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TINY))
def test_hf_megatron_hf_is_bit_exact(name, imported, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf, mckpt = imported[name]
    r = megatron_to_hf_checkpoint(mckpt, tmp_path / "out")
    assert_same_weights(hf, tmp_path / "out")
    assert r["dtype"] == (torch.bfloat16 if name == "mistral" else torch.float32)
    cfg = AutoConfig.from_pretrained(tmp_path / "out")
    orig = AutoConfig.from_pretrained(hf)
    for k in ("model_type", "vocab_size", "hidden_size", "num_key_value_heads", "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(cfg, k) == getattr(orig, k), k
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # loads with no missing weights
    assert model.config.architectures == orig.architectures
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "out" / f).read_bytes() == (hf / f).read_bytes()


@pytest.mark.slow
def test_trained_rope_base_reaches_config_json(imported, tmp_path):
    from transformers import AutoConfig

    _, mckpt = imported["llama"]
    trained = tmp_path / "trained"
    shutil.copytree(mckpt, trained)
    meta = json.loads((trained / "model.json").read_text())
    meta["arch"].update(rope_theta=2_500_000.0, max_position_embeddings=1024)  # what a LongPO run records
    (trained / "model.json").write_text(json.dumps(meta))
    megatron_to_hf_checkpoint(trained, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["rope_theta"] == 2_500_000.0 and cfg["rope_parameters"]["rope_theta"] == 2_500_000.0
    assert cfg["max_position_embeddings"] == 1024
    loaded = AutoConfig.from_pretrained(tmp_path / "hf")
    assert loaded.rope_parameters["rope_theta"] == 2_500_000.0 and loaded.max_position_embeddings == 1024


@pytest.mark.slow
def test_smollm2_round_trip_generates_the_same_text(smollm2_dir, imported, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, mckpt = imported["smollm2"]
    peak, out = _export_with_peak_rss(mckpt, tmp_path / "hf")
    assert "exported" in out and "1 shard(s)" in out and "rope_theta 100000" in out, out[-2000:]
    ckpt_bytes = sum(f.stat().st_size for f in (mckpt / "iter_0000000").iterdir())
    base, _ = _peak_rss([sys.executable, "-c", "import torch.distributed.checkpoint, megatron_longpo.checkpoint.export"])
    print(f"SmolLM2 export: peak RSS {peak:.0f} MiB, imports alone {base:.0f} MiB, checkpoint {ckpt_bytes / 2**20:.0f} MiB")
    assert peak - base < 0.6 * ckpt_bytes / 2**20, "the exporter holds the model in memory instead of streaming it"
    assert_same_weights(smollm2_dir, tmp_path / "hf")

    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    n = prompt.shape[1]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        ids = exported.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
        # The original model's greedy choice at every generated position, in one forward pass:
        # equal tokens <=> greedy generation with the original gives the same text.
        original = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
        greedy = original(ids).logits[0, n - 1: -1].argmax(-1)
    text = tok.decode(ids[0, n:], skip_special_tokens=True)
    print(f"exported SmolLM2 says: {text!r}")
    assert torch.equal(greedy, ids[0, n:]) and "Paris" in text, (text, tok.decode(greedy))


def _peak_rss(cmd, timeout=600):
    import signal
    import threading

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    try:
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # the kernel's peak RSS of exactly this child
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, out[-3000:]
    return usage.ru_maxrss / 1024, out


def _export_with_peak_rss(mckpt, out):
    return _peak_rss([sys.executable, str(CLI), "megatron-to-hf", "--megatron-dir", str(mckpt), "--out", str(out)])


# --------------------------------------------------------------------------------------------
# reshard
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_reshard_dist_tp2_same_weights_and_logits(imported, tmp_path):
    hf, mckpt = imported["llama"]
    r = cli("reshard", "--megatron-dir", mckpt, "--out", tmp_path / "tp2", "--tp", 2, "--pp", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = DistCheckpointReader(ckpt.latest_iteration_dir(mckpt)), DistCheckpointReader(tmp_path / "tp2" / "iter_0000000")
    model_keys = lambda rd: {k for k in rd.tensors if not k.startswith("optimizer.")}  # noqa: E731
    assert model_keys(a) == model_keys(b)
    for k in model_keys(a):
        assert torch.equal(a.read(k), b.read(k)), k
    assert len(b.tensors["embedding.word_embeddings.weight"].chunks) == 2  # really written by two TP ranks
    meta = json.loads((tmp_path / "tp2" / "model.json").read_text())
    assert meta["intended_layout"] == {"tensor_parallel": 2, "pipeline_parallel": 1}
    # a checkpoint saved at TP=2 exports the same Hugging Face weights
    megatron_to_hf_checkpoint(tmp_path / "tp2", tmp_path / "hf")
    assert_same_weights(hf, tmp_path / "hf")
    # both checkpoints loaded at TP=2 give identical logits
    tokens = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, tmp_path / "tokens.pt")
    torchrun(2, "reshard_logits.py", mckpt, tmp_path / "tp2", 2, 1, tmp_path / "tokens.pt", tmp_path / "logits.pt")
    logits = torch.load(tmp_path / "logits.pt")
    assert logits["a"].shape == (2, 12, 49152 + 64) and torch.isfinite(logits["b"]).all()
    assert torch.equal(logits["a"], logits["b"])


@pytest.mark.slow
def test_reshard_legacy_tp2_pp2_holds_the_right_slices(imported, tmp_path):
    _, mckpt = imported["llama"]
    r = cli("reshard", "--megatron-dir", mckpt, "--out", tmp_path / "legacy", "--tp", 2, "--pp", 2, "--format", "legacy")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "legacy"
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    ranks = sorted(p.name for p in (out / "iter_0000000").iterdir())
    assert ranks == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    sd = {(t, p): torch.load(out / "iter_0000000" / f"mp_rank_{t:02d}_{p:03d}" / "model_optim_rng.pt", weights_only=False)
          for t in range(2) for p in range(2)}
    assert all(s["checkpoint_version"] == 3.0 and s["iteration"] == 0 for s in sd.values())
    full = DistCheckpointReader(ckpt.latest_iteration_dir(mckpt))
    cat = lambda name, p, dim: torch.cat([sd[(t, p)]["model"][name] for t in range(2)], dim=dim)  # noqa: E731
    assert torch.equal(cat("embedding.word_embeddings.weight", 0, 0), full.read("embedding.word_embeddings.weight"))
    assert torch.equal(cat("output_layer.weight", 1, 0), full.read("output_layer.weight"))
    assert torch.equal(sd[(0, 1)]["model"]["decoder.final_layernorm.weight"], full.read("decoder.final_layernorm.weight"))
    assert "embedding.word_embeddings.weight" not in sd[(0, 1)]["model"] and "output_layer.weight" not in sd[(0, 0)]["model"]
    for p in range(2):
        for j in range(2):  # layers numbered from 0 on each stage: stage p, local j = global 2p + j
            i, pre = 2 * p + j, f"decoder.layers.{j}."
            g = lambda k: full.read(f"decoder.layers.{k}", index=i)  # noqa: E731
            assert torch.equal(cat(pre + "self_attention.linear_qkv.weight", p, 0), g("self_attention.linear_qkv.weight"))
            assert torch.equal(cat(pre + "self_attention.linear_proj.weight", p, 1), g("self_attention.linear_proj.weight"))
            assert torch.equal(cat(pre + "mlp.linear_fc2.weight", p, 1), g("mlp.linear_fc2.weight"))
            halves = [torch.chunk(sd[(t, p)]["model"][pre + "mlp.linear_fc1.weight"], 2) for t in range(2)]
            gate_up = torch.cat([halves[0][0], halves[1][0], halves[0][1], halves[1][1]])  # [gate_0 gate_1; up_0 up_1]
            assert torch.equal(gate_up, g("mlp.linear_fc1.weight"))
            for t in range(2):  # TE names; norms replicated on every TP rank
                m = sd[(t, p)]["model"]
                assert torch.equal(m[pre + "self_attention.linear_qkv.layer_norm_weight"], g("self_attention.linear_qkv.layer_norm_weight"))
                assert torch.equal(m[pre + "mlp.linear_fc1.layer_norm_weight"], g("mlp.linear_fc1.layer_norm_weight"))
                assert not any(k.endswith("input_layernorm.weight") for k in m)
    meta = json.loads((out / "model.json").read_text())
    assert meta["format"] == "legacy"
    r = cli("megatron-to-hf", "--megatron-dir", out, "--out", tmp_path / "hf", timeout=120)
    assert r.returncode == 2 and "legacy per-rank layout" in r.stderr

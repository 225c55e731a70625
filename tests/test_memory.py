"""Memory keys -> megatron-core's config objects (models/megatron_config.py), refused combinations, and the memory plan's
arithmetic against the tensors of a real (tiny, CPU) model and optimizer (docs/training.md "Will it fit")."""

from dataclasses import replace

import pytest
import torch

from megatron_longpo.config import ConfigError, OptimSection, load_config
from megatron_longpo.models.megatron_config import precision_aware
from megatron_longpo.training import memory
from megatron_longpo.training import memory_check as MC
from megatron_longpo.training import memory_plan as P

TINY = dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=160,
            vocab_size=1000, rms_norm_eps=1e-5, rope_theta=1e4, tie_word_embeddings=False, hidden_act="silu",
            num_hidden_layers=3, max_position_embeddings=4096)


def _arch(**kw):
    from megatron_longpo.models.hf_config import arch_from_hf_config

    return arch_from_hf_config({**TINY, **kw})


def test_keys_parse_and_bad_values_name_the_key():
    cfg = load_config(None, ["optim.cpu_offload=true", "optim.offload_fraction=0.5", "optim.offload_overlap=true",
                             "optim.grad_dtype=bf16", "model.activation_offload_layers=2", "train.memory_check=warn"])
    assert (cfg.optim.cpu_offload, cfg.optim.offload_fraction, cfg.optim.offload_overlap, cfg.optim.grad_dtype) == (
        True, 0.5, True, "bf16")
    assert cfg.model.activation_offload_layers == 2 and cfg.train.memory_check == "warn"
    assert precision_aware(cfg.optim) is True  # None: on with cpu_offload
    for bad, key in (("optim.grad_dtype=fp8", "optim.grad_dtype"), ("optim.offload_fraction=0", "optim.offload_fraction"),
                     ("optim.exp_avg_dtype=int8", "optim.exp_avg_dtype"), ("train.memory_check=maybe", "train.memory_check"),
                     ("model.activation_offload_layers=-1", "model.activation_offload_layers")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [bad])


def test_keys_reach_megatron_core_config_objects():
    from megatron_longpo.models.build import ModelOptions
    from megatron_longpo.models.megatron_config import megatron_configs, transformer_config
    from megatron_longpo.parallel import ParallelConfig
    from megatron_longpo.training.engine import model_options

    o = OptimSection(cpu_offload=True, offload_fraction=0.75, offload_overlap=True, grad_dtype="bf16")
    c = megatron_configs(_arch(), ParallelConfig(), ModelOptions(bf16=True), o, cuda=True)
    oc = c.optimizer
    assert oc.optimizer_cpu_offload and oc.optimizer_offload_fraction == 0.75 and oc.overlap_cpu_optimizer_d2h_h2d
    assert oc.use_precision_aware_optimizer and oc.main_grads_dtype == torch.bfloat16
    assert oc.use_precision_aware_optimizer_no_fp8_or_ds_fp8  # the branch that keeps no fp32 copy on the GPU
    assert c.ddp.grad_reduce_in_fp32 is False
    default = megatron_configs(_arch(), ParallelConfig(), ModelOptions(), OptimSection(), cuda=True)
    assert not default.optimizer.optimizer_cpu_offload and not default.optimizer.use_precision_aware_optimizer
    assert default.optimizer.main_grads_dtype == torch.float32
    assert default.ddp.grad_reduce_in_fp32 is True
    cfg = load_config(None, ["model.activation_offload_layers=2", "model.bf16=false"])
    tc = transformer_config(_arch(), ParallelConfig(), model_options(cfg), cuda=False)
    assert tc.cpu_offloading and tc.cpu_offloading_num_layers == 2 and tc.cpu_offloading_activations
    assert not tc.cpu_offloading_weights
    tc = transformer_config(_arch(), ParallelConfig(), ModelOptions(recompute="full", recompute_num_layers=3), cuda=False)
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == ("full", "uniform", 3)
    assert not tc.cpu_offloading
    cfg = load_config(None, ["model.recompute=full", "model.recompute_method=block", "model.recompute_num_layers=2"])
    tc = transformer_config(_arch(), ParallelConfig(), model_options(cfg), cuda=False)
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == ("full", "block", 2)
    with pytest.raises(ValueError, match="model.recompute=auto is chosen by the memory plan"):
        transformer_config(_arch(), ParallelConfig(), ModelOptions(recompute="auto"), cuda=False)
    cfg = load_config(None, ["model.recompute=selective", "model.recompute_modules=mlp,layernorm"])
    assert cfg.model.recompute_modules == ("mlp", "layernorm")
    assert load_config(None, ["model.recompute=selective", "model.recompute_modules=[mlp]"]).model.recompute_modules == ("mlp",)
    tc = transformer_config(_arch(), ParallelConfig(), ModelOptions(recompute="selective", recompute_modules=("mlp",)),
                            cuda=False)
    assert (tc.recompute_granularity, tc.recompute_modules) == ("selective", ["mlp"])
    with pytest.raises(ConfigError, match="model.recompute_modules: 'attn' is not one of core_attn, layernorm, mlp"):
        load_config(None, ["model.recompute=selective", "model.recompute_modules=attn"])
    with pytest.raises(ConfigError, match="model.recompute_modules=mlp needs model.recompute=selective"):
        load_config(None, ["model.recompute=full", "model.recompute_modules=mlp"])


@pytest.mark.parametrize("optim, kw, msg", [
    (OptimSection(cpu_offload=True), dict(cuda=False), "optim.cpu_offload=true needs a GPU"),
    (OptimSection(cpu_offload=True, distributed_optimizer=False), dict(cuda=True), "needs megatron's distributed optimizer"),
    (OptimSection(cpu_offload=True, precision_aware=False), dict(cuda=True), "needs the precision-aware optimizer"),
    (OptimSection(offload_fraction=0.5), dict(cuda=True), "optim.offload_fraction=0.5 has no effect"),
    (OptimSection(offload_overlap=True), dict(cuda=True), "optim.offload_overlap=true has no effect"),
    (OptimSection(precision_aware=True), dict(cuda=True, use_te=False), "needs Transformer Engine's FusedAdam"),
    (OptimSection(precision_aware=True, name="sgd"), dict(cuda=True), "needs optim.name=adam"),
    (OptimSection(exp_avg_dtype="bf16"), dict(cuda=True), "optim.exp_avg_dtype=bf16 needs optim.precision_aware=true"),
    (OptimSection(cpu_offload=True, exp_avg_sq_dtype="bf16"), dict(cuda=True), "not honoured with optim.cpu_offload"),
    (OptimSection(), dict(cuda=False, activation_offload_layers=1), "needs a GPU with Transformer Engine"),
    (OptimSection(), dict(cuda=True, activation_offload_layers=1, recompute="full"), "cannot be combined with model.recompute"),
    (OptimSection(), dict(cuda=True, activation_offload_layers=1, pipeline_parallel=2), "does not support pipeline"),
    (OptimSection(), dict(cuda=True, activation_offload_layers=4, num_layers=4), "must be below the number of layers"),
])
def test_impossible_combinations_are_refused_with_one_message(optim, kw, msg):
    args = dict(cuda=True, use_te=True, distributed_optimizer=optim.distributed_optimizer)
    args.update(kw)
    with pytest.raises(memory.MemoryOptionError, match=msg) as e:
        memory.check(optim, **args)
    assert "\n" not in str(e.value)


def test_possible_combinations_pass():
    memory.check(OptimSection(), cuda=False, use_te=False, distributed_optimizer=True)
    memory.check(OptimSection(grad_dtype="bf16"), cuda=False, use_te=False, distributed_optimizer=False)
    memory.check(OptimSection(cpu_offload=True, offload_fraction=0.5, grad_dtype="bf16"), cuda=True, use_te=True,
                 distributed_optimizer=True, recompute="full")
    memory.check(OptimSection(), cuda=True, use_te=True, distributed_optimizer=True, activation_offload_layers=3, num_layers=4)


@pytest.fixture(scope="module")
def cpu_engine():
    """The real engine (build_engine: model, DDP, megatron optimizer) of a tiny untied Llama on the
    CPU (fp32, plain optimizer), after one Adam step so that its moments exist."""
    from megatron_longpo import parallel
    from megatron_longpo.models.build import ModelOptions
    from megatron_longpo.training.engine import build_engine

    import os

    arch = _arch()
    par = parallel.ParallelConfig()
    saved = dict(os.environ)
    parallel.setup(par, seed=0, arch=arch)
    # the in-process group holds MASTER_PORT: tools the other tests start must not inherit it
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if k not in saved:
            os.environ.pop(k, None)
    chunks, opt = build_engine(arch, par, ModelOptions(bf16=False, use_te=False), OptimSection(lr=1e-3), None)
    for c in chunks:
        c.zero_grad_buffer()
        for b in c.buffers:
            b.grad_data.fill_(1e-3)
    opt.step()
    return arch, chunks, opt


def test_plan_static_memory_equals_the_built_tensors(cpu_engine):
    arch, chunks, opt = cpu_engine
    params = {id(p): p for c in chunks for p in c.parameters()}
    param_bytes = sum(p.numel() * p.element_size() for p in params.values())
    grad_bytes = sum(b.grad_data.numel() * b.grad_data.element_size() for c in chunks for b in c.buffers)
    state_bytes = 0
    for st in opt.state_dict()["optimizer"]["state"].values() if "optimizer" in opt.state_dict() else opt.state_dict()["state"].values():
        state_bytes += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    assert sum(p.numel() for p in params.values()) == P.stage_params(arch)
    p = P.plan(P.PlanInputs(arch, row_tokens=1024, scored_tokens=64, bf16=False, distributed_optimizer=False))
    assert p.params == param_bytes
    assert p.grads == grad_bytes  # the DDP buffer, fp32
    assert state_bytes > 0 and p.optim_states == state_bytes and p.main_params == 0  # fp32 parameters: Adam's two moments, no copy


def test_plan_static_memory_of_the_7b_cases():
    """The bookkeeping behind docs/training.md's table: a 7B with the distributed optimizer keeps an fp32
    parameter copy on the GPU even with cpu_offload, unless the precision-aware optimizer is on."""
    arch = _arch(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                 vocab_size=32000, num_hidden_layers=32)
    n = P.stage_params(arch)
    assert n == 7_241_732_096  # Mistral-7B
    base = dict(row_tokens=1024, scored_tokens=64)
    plain = P.plan(P.PlanInputs(arch, **base))
    assert (plain.params, plain.grads, plain.main_params, plain.optim_states) == (2 * n, 4 * n, 4 * n, 8 * n)
    off = P.plan(P.PlanInputs(arch, **base, cpu_offload=True, offload_fraction=1.0, precision_aware=False))
    assert (off.main_params, off.optim_states) == (4 * n, 0)  # the ~27 GiB that offloading alone leaves
    pa = P.plan(P.PlanInputs(arch, **base, cpu_offload=True, offload_fraction=1.0, precision_aware=True, grad_dtype="bf16"))
    assert (pa.grads, pa.main_params, pa.optim_states) == (2 * n, 0, 0)
    assert pa.host == n * (4 + 8 + 4 + 2)
    half = P.plan(P.PlanInputs(arch, **base, cpu_offload=True, offload_fraction=0.5, precision_aware=True))
    assert (half.main_params, half.optim_states) == (2 * n, 4 * n)


def test_plan_reproduces_its_calibration_points():
    arch = _arch(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                 vocab_size=32000, num_hidden_layers=4)
    for rec, key in ((None, "none_responses"), ("full", "full_responses")):
        for rows, gib in zip(P.CALIBRATION["rows"], P.CALIBRATION[key]):
            got = P.plan(P.PlanInputs(arch, rows, 1024, recompute=rec)).peak / P.GIB
            assert abs(got - gib) / gib < 0.02, (rec, rows, got, gib)
    for rows, gib in zip(P.CALIBRATION["rows"], P.CALIBRATION["none_sequence"]):
        got = P.plan(P.PlanInputs(arch, rows, rows - 1, recompute=None)).peak / P.GIB
        assert abs(got - gib) / gib < 0.02


def test_plan_activations_order_of_magnitude_on_the_cpu(cpu_engine):
    """Bytes of the tensors autograd saves in a forward of the tiny fp32 model (local spec), leaving out
    the parameters and the [s, s] attention scores (the plan assumes fused attention, as on GPUs),
    against the plan's saved activations: same order of magnitude (the constants are bf16/TE ones)."""
    from megatron_longpo.models.build import unwrap

    arch, chunks, _ = cpu_engine
    s = 256
    params = {p.data_ptr() for c in chunks for p in c.parameters()}
    seen = {}

    def pack(t):
        if t.data_ptr() not in params and not (t.dim() >= 2 and t.shape[-1] == t.shape[-2] == s):
            seen[(t.data_ptr(), t.dtype)] = max(seen.get((t.data_ptr(), t.dtype), 0), t.numel() * t.element_size())
        return t

    tokens = torch.randint(0, 1000, (1, s))
    pos = torch.arange(s).unsqueeze(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unwrap(chunks[0])(tokens, pos, None)
    measured = sum(seen.values())
    c = P._fit()
    planned = arch.num_layers * c["saved"] * 4 * P._layer_elems(arch.hidden_size, arch.num_query_groups * arch.head_dim,
                                                                  arch.ffn_hidden_size) * s
    print(f"saved activations: measured {measured:,} B, planned {planned:,.0f} B")
    assert planned / 3 < measured < planned * 3, (measured, planned)


def test_refusal_names_the_knob():
    arch = _arch(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                 vocab_size=32000, num_hidden_layers=32)
    p = P.plan(P.PlanInputs(arch, 131585, 131584), 139.8 * P.GIB)
    assert p.verdict == "does not fit"
    assert P.advice(p).startswith("turn model.recompute=full optim.cpu_offload=true")
    assert "to fit: turn" in P.describe(p)
    fits = P.plan(P.PlanInputs(arch, 131585, 131584, recompute="full", cpu_offload=True, precision_aware=True), 139.8 * P.GIB)
    assert fits.verdict == "fits" and P.advice(fits) == ""


def test_block_recompute_has_the_gradients_of_none_and_keeps_less(cpu_engine):
    """Block recompute of 1 of 2 layers, and of 2 of 2, and selective recompute of the MLPs, on a tiny
    fp32 model (local spec, CPU): the
    gradients of a forward and backward equal those without recompute, bit for bit; the bytes autograd
    holds saved at once (peak over the forward and backward, the recompute included) drop from none
    to block 1 of 2 to block 2 of 2, which keeps exactly what full uniform recompute keeps."""
    import weakref

    from megatron_longpo.models.build import ModelOptions, build_model
    from megatron_longpo.parallel import ParallelConfig

    arch = _arch(num_hidden_layers=2)
    s = 128
    tokens = torch.randint(0, 1000, (1, s), generator=torch.Generator().manual_seed(1))
    w = torch.randn(s, arch.padded_vocab_size, generator=torch.Generator().manual_seed(2))
    state = {}

    def run(**recompute):
        model = build_model(arch, ParallelConfig(), ModelOptions(bf16=False, use_te=False, **recompute))[0]
        if state:
            model.load_state_dict(state)
        else:
            state.update(model.state_dict())
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        live, now, peak = {}, [0], [0]  # storage -> [references, bytes]; bytes saved now; their peak

        class Saved:
            def __init__(self, t):
                self.t = t

        def gone(key):
            live[key][0] -= 1
            if not live[key][0]:
                now[0] -= live.pop(key)[1]

        def pack(t):
            key = t.untyped_storage().data_ptr()
            if key in params:
                return t
            if key not in live:
                live[key] = [0, t.untyped_storage().nbytes()]
                now[0] += live[key][1]
                peak[0] = max(peak[0], now[0])
            live[key][0] += 1
            box = Saved(t)
            weakref.finalize(box, gone, key)
            return box

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda b: b.t if isinstance(b, Saved) else b):
            (model(tokens, torch.arange(s).unsqueeze(0), None)[0] * w).sum().backward()
        assert now[0] == 0  # every saved tensor was freed: the bookkeeping saw them all
        return {n: p.grad for n, p in model.named_parameters()}, peak[0]

    none, none_peak = run()
    block1, block1_peak = run(recompute="full", recompute_method="block", recompute_num_layers=1)
    block2, block2_peak = run(recompute="full", recompute_method="block", recompute_num_layers=2)
    full, full_peak = run(recompute="full", recompute_num_layers=1)
    mlp, mlp_peak = run(recompute="selective", recompute_modules=("mlp",))
    assert len(none) == len(block1) > 0 and any(g.abs().sum() > 0 for g in none.values())
    for name, g in none.items():
        for other in (block1, block2, full, mlp):
            torch.testing.assert_close(other[name], g, rtol=0, atol=1e-6, msg=name)
    # measured: 2,706,944 / 1,714,688 / 1,091,584 bytes
    assert none_peak > block1_peak > block2_peak == full_peak, (none_peak, block1_peak, block2_peak, full_peak)
    # selective: every layer drops its MLP's inner tensors (layernorm recompute needs TE: megatron-core's
    # CheckpointWithoutOutput reads TE's FP8 state, so the local spec refuses it before the build)
    assert none_peak > mlp_peak > full_peak, (none_peak, mlp_peak, full_peak)
    with pytest.raises(ValueError, match="model.recompute_modules=layernorm needs the Transformer Engine spec"):
        run(recompute="selective", recompute_modules=("mlp", "layernorm"))


def _mistral(**kw):
    return _arch(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, vocab_size=32000,
                 num_hidden_layers=32, **kw)


def test_selective_recompute_plan_drops_the_mlp_and_norm_tensors():
    """Selective recompute of the MLP: every layer keeps its tensors less the MLP's fc1 output and gate
    (3 x ffn elements a token, 43,008 of Mistral-7B's 73,728), plus one layer's of them while the backward
    recomputes it; with the norms too, 2 x hidden more. core_attn alone (megatron-core's default) drops
    nothing: the fused attention saves no score matrix. Its cost is the MLPs' forward, 32 x 352 MFLOP a token."""
    arch = _mistral()
    L, tok = arch.num_layers, 131585
    base = P.PlanInputs(arch, row_tokens=tok, scored_tokens=1024)

    def acts(**kw):
        return P.plan(replace(base, **kw)).activations

    per = P._fit()["saved"] * 2 * tok  # bytes per saved element a token (bf16, calibrated)
    none = acts(recompute=None)
    assert acts(recompute="selective") == acts(recompute="selective", recompute_modules=("core_attn",)) == none
    mlp = acts(recompute="selective", recompute_modules=("mlp",))
    assert mlp == pytest.approx(none - (L - 1) * per * 3 * 14336, rel=1e-12)
    both = acts(recompute="selective", recompute_modules=("mlp", "layernorm"))
    assert both == pytest.approx(none - (L - 1) * per * (3 * 14336 + 2 * 4096), rel=1e-12)
    assert acts(recompute="full") < both < mlp < none
    assert P.recompute_flops(replace(base, recompute="selective", recompute_modules=("mlp",))) == L * 6 * 4096 * 14336
    assert "recompute selective (mlp, layernorm)" in P.plan(replace(base, recompute="selective",
                                                                    recompute_modules=("mlp", "layernorm"))).table()


def test_block_recompute_plan_lies_between_none_and_full():
    """Block recompute of N of a stage's L layers: the first N keep only their bf16 input, the other
    L - N all their saved tensors; the backward reaches the recomputed layers after the others are
    freed. So each N saves one layer less its input; N = L - 1 plans one layer input below full
    recompute (recomputing a stage's last layer saves nothing: its backward comes first), and N = L
    (or more) plans exactly full uniform recompute of one layer per chunk, which is what megatron runs."""
    arch = _mistral()
    L = arch.num_layers
    base = P.PlanInputs(arch, row_tokens=131585, scored_tokens=1024)

    def acts(**kw):
        return P.plan(replace(base, **kw)).activations

    none, full = acts(recompute=None), acts(recompute="full", recompute_num_layers=1)
    block = [acts(recompute="full", recompute_method="block", recompute_num_layers=n) for n in range(1, L + 2)]
    layer_input = 2 * arch.hidden_size * 131585  # bf16
    assert none > block[0] and all(a > b for a, b in zip(block, block[1:L - 1]))  # N = 1 .. L - 1: decreasing
    assert all(full < a < none for a in block[:L - 2])  # N = 1 .. L - 2
    assert block[L - 2] == pytest.approx(full - layer_input, rel=1e-12)  # N = L - 1
    assert block[L - 1] == pytest.approx(full, rel=1e-12) and block[L] == block[L - 1]  # N = L, L + 1
    per_layer = none - block[0]  # one layer's saved tensors less its input
    assert per_layer > 10 * layer_input
    assert all(a == pytest.approx(none - n * per_layer, rel=1e-12) for n, a in enumerate(block[:L - 1], 1))
    note = P.plan(replace(base, recompute="full", recompute_method="block", recompute_num_layers=12)).table()
    assert "recompute full, block, 12 of 32 layers" in note
    pp = P.plan(replace(base, pp=2, recompute="full", recompute_method="block", recompute_num_layers=40)).table()
    assert "recompute full, block, 16 of 16 layers" in pp


def test_choose_recompute_picks_the_cheapest_that_fits():
    """model.recompute=auto: of none, selective (every layer's MLP; its MLP and norms), block N = 1, 2, ...,
    L - 1 and full uniform, the one that reruns the fewest forward FLOPs among those whose peak is within
    90% of the GPU. At 64K a layer's MLP is about a third of its forward, so selective MLP recompute
    (32 MLPs) costs what block recompute of about 11 layers costs, and keeps far less."""
    arch = _mistral()
    base = P.PlanInputs(arch, row_tokens=65536, scored_tokens=1024, recompute="auto", cpu_offload=True, precision_aware=True,
                        grad_dtype="bf16")

    def peak(**kw):
        return P.plan(replace(base, **kw)).peak

    def cost(**kw):
        return P.recompute_flops(replace(base, **kw))

    none, full = peak(recompute=None), peak(recompute="full", recompute_num_layers=1)
    mlp = peak(recompute="selective", recompute_modules=("mlp",))
    both = peak(recompute="selective", recompute_modules=("mlp", "layernorm"))
    assert full < both < mlp < none
    assert cost(recompute="full", recompute_method="block", recompute_num_layers=11) < cost(
        recompute="selective", recompute_modules=("mlp",)) < cost(recompute="full", recompute_method="block", recompute_num_layers=12)

    # midway between none and full: selective MLP recompute fits, and block recompute would need more than 12 layers
    device = (none + full) / 2 / P.FIT
    got = P.choose_recompute(base, device)
    assert (got.recompute, got.recompute_modules) == ("selective", ("mlp",)) and P.plan(got, device).verdict == "fits"
    assert peak(recompute="full", recompute_method="block", recompute_num_layers=12) > P.FIT * device

    # between what the MLPs alone and the MLPs and norms keep: the norms too, with TE only (the local spec
    # cannot recompute them)
    device = (both + mlp) / 2 / P.FIT
    got = P.choose_recompute(base, device)
    assert (got.recompute, got.recompute_modules) == ("selective", ("mlp", "layernorm"))
    assert "layernorm" not in (P.choose_recompute(replace(base, te=False), device).recompute_modules or ())

    # below what selective recompute keeps: the least block recompute that fits
    device = (both + full) / 2 / P.FIT
    got = P.choose_recompute(base, device)
    n = got.recompute_num_layers
    assert (got.recompute, got.recompute_method) == ("full", "block") and 12 < n < arch.num_layers - 1, got
    assert P.plan(got, device).peak <= P.FIT * device < peak(recompute="full", recompute_method="block", recompute_num_layers=n - 1)

    above = P.choose_recompute(base, none / P.FIT * 1.01)
    assert (above.recompute, above.recompute_num_layers) == (None, 1)
    assert P.choose_recompute(base, None).recompute is None  # no GPU: nothing to fit

    below = P.choose_recompute(base, full / 2)
    assert (below.recompute, below.recompute_method, below.recompute_num_layers) == ("full", "uniform", 1)
    p = P.plan(below, full / 2)
    assert p.verdict == "does not fit" and "model.recompute" not in P.advice(p) and P.advice(p)
    i, line = P.resolve_recompute(base, device)
    assert i == got and line == (f"model.recompute=auto: recompute full, block, {n} of 32 layers (the cheapest that fits "
                                 f"under 90% of the GPU): predicted peak {P.plan(got, device).peak / P.GIB:.1f} of "
                                 f"{device / P.GIB:.1f} GiB")
    assert "the most there is, and still over 90%" in P.resolve_recompute(base, full / 2)[1]
    with pytest.raises(ValueError, match="auto"):
        P.plan(base, device)


def test_advice_for_block_recompute_names_uniform():
    arch = _mistral()
    p = P.plan(P.PlanInputs(arch, 131585, 131584, recompute="full", recompute_method="block", recompute_num_layers=2),
               139.8 * P.GIB)
    assert P.advice(p).startswith("turn model.recompute=full model.recompute_method=uniform model.recompute_num_layers=1 "
                                  "optim.cpu_offload=true")


def test_plan_command_prints_the_auto_choice(tmp_path):
    """`python -m megatron_longpo.train --plan` with model.recompute=auto: the choice's line, and the
    table of that choice."""
    import json

    hf = tmp_path / "config.json"
    hf.write_text(json.dumps({**TINY, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
                              "intermediate_size": 14336, "vocab_size": 32000, "num_hidden_layers": 32}))
    keys = ["model.recompute=auto", "data.share_prefix=true", "optim.cpu_offload=true", "optim.grad_dtype=bf16"]
    out = MC.plan_command(load_config(None, keys), length=65536, hf_config=str(hf), device_gib=80)
    chose = [x for x in out.splitlines() if x.startswith("model.recompute=auto: recompute full, block, ")]
    assert len(chose) == 1 and "of 80.0 GiB" in chose[0], out
    n = chose[0].split("block, ")[1].split(" of")[0]
    assert f"recompute full, block, {n} of 32 layers" in out.split("memory plan")[1] and ": fits" in out, out
    out = MC.plan_command(load_config(None, keys), length=1024, hf_config=str(hf), device_gib=80)
    assert "model.recompute=auto: recompute none (the cheapest that fits" in out and "  recompute none" in out, out


def _tool(name):
    import importlib.util

    from fixtures import ROOT

    spec = importlib.util.spec_from_file_location(name, ROOT / f"tools/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bench():
    return _tool("bench_train_step")


@pytest.mark.parametrize("limit", [5000, 70000, 131072, 200000, 300000])
def test_until_oom_doubles_then_bisects_one_process_per_probe(limit):
    bench = _bench()
    calls = []

    def probe(lengths):  # one "process": runs lengths in order, stops at the first that does not fit
        calls.append(list(lengths))
        rows = []
        for n in lengths:
            rows.append({"length": n, "status": "ok" if n <= limit else "OOM"})
            if n > limit:
                break
        return rows

    best, rows = bench.until_oom(probe, 32768, 8192, 1 << 20)
    if limit < 8192:
        assert best is None
    else:
        assert best is not None and limit - 8192 < best <= limit, (best, limit)
    assert calls[0] == [32768, 65536, 131072, 262144, 524288, 1048576]  # the doubling ladder, one process
    assert all(len(c) == 1 for c in calls[1:])  # every bisection probe in its own process


def test_trainer_plan_refuses_or_warns_before_the_build(tiny_llama_ckpt, tiny_longpo_data, monkeypatch):
    """check_run (called by build_trainer before the model is built) on a real dataset: its longest
    sample sets the row; a GPU too small is refused with the knob, or warned about with memory_check=warn."""
    from megatron_longpo.checkpoint.dist import read_model_json

    arch = read_model_json(tiny_llama_ckpt)[0]
    base = [f"model.checkpoint={tiny_llama_ckpt}", f"data.path={tiny_longpo_data}"]
    lines = []
    monkeypatch.setattr(P, "device_bytes", lambda: None)
    p = MC.check_run(load_config(None, base), arch, 1, lines.append)
    assert p.verdict == "not checked (no GPU)" and lines[0].startswith("memory plan (per GPU, GiB):")
    assert p.inputs.row_tokens > 100
    tiny_gpu = p.peak / 2  # a GPU with half the predicted peak
    monkeypatch.setattr(P, "device_bytes", lambda: tiny_gpu)
    with pytest.raises(MC.MemoryPlanError, match=r"more than the GPU's .*model.recompute=full.*train.memory_check=warn"):
        MC.check_run(load_config(None, base), arch, 1, lines.append)
    lines.clear()
    MC.check_run(load_config(None, base + ["train.memory_check=warn"]), arch, 1, lines.append)
    assert any(x.startswith("WARNING: the memory plan predicts") for x in lines)
    assert MC.check_run(load_config(None, base + ["train.memory_check=off"]), arch, 1, lines.append) is None


def test_trainer_plan_chooses_recompute_auto(tiny_llama_ckpt, tiny_longpo_data, monkeypatch):
    """model.recompute=auto in the trainer's plan (check_run, before the build): one line names the
    choice, the plan printed is the choice's, and chosen_recompute(cfg, plan) is the configuration the
    engine builds from (engine.model_options reads it); on the CPU (no device size) no recompute."""
    from megatron_longpo.checkpoint.dist import read_model_json
    from megatron_longpo.training.engine import model_options

    arch = read_model_json(tiny_llama_ckpt)[0]
    cfg = load_config(None, [f"model.checkpoint={tiny_llama_ckpt}", f"data.path={tiny_longpo_data}", "model.recompute=auto",
                             "model.recompute_num_layers=3"])
    lines = []
    monkeypatch.setattr(P, "device_bytes", lambda: None)
    p = MC.check_run(cfg, arch, 1, lines.append)
    assert lines[0] == "model.recompute=auto: no recompute (no GPU: the device's memory is unknown, nothing to fit)"
    assert "recompute none" in lines[1] and p.inputs.recompute is None
    built = MC.chosen_recompute(cfg, p)
    assert (built.model.recompute, built.model.recompute_method) == (None, "uniform") and model_options(built).recompute is None

    def peak(**kw):
        return P.plan(replace(p.inputs, **kw)).peak

    # selective recompute, when the plan chooses it, reaches the build with its modules
    sel = MC.chosen_recompute(cfg, P.plan(replace(p.inputs, recompute="selective", recompute_modules=("mlp",)), 1e12))
    assert (sel.model.recompute, sel.model.recompute_modules) == ("selective", ("mlp",))
    assert (model_options(sel).recompute, model_options(sel).recompute_modules) == ("selective", ("mlp",))

    # a GPU on which no recompute, block recompute of 1 of the 4 layers and selective recompute (the MLPs, and
    # the MLPs and norms: cheaper than block 2 here, each keeping more) do not fit, and block 2 of 4 does
    both = peak(recompute="selective", recompute_modules=("mlp", "layernorm"))
    block2 = peak(recompute="full", recompute_method="block", recompute_num_layers=2)
    assert block2 < both < peak(recompute="selective", recompute_modules=("mlp",))
    device = (block2 + min(both, peak(recompute="full", recompute_method="block", recompute_num_layers=1))) / 2 / P.FIT
    monkeypatch.setattr(P, "device_bytes", lambda: device)
    lines.clear()
    p = MC.check_run(cfg, arch, 1, lines.append)
    assert lines[0].startswith("model.recompute=auto: recompute full, block, 2 of 4 layers (the cheapest that fits"), lines
    assert "recompute full, block, 2 of 4 layers" in lines[1] and p.verdict == "fits"
    built = MC.chosen_recompute(cfg, p)
    assert (built.model.recompute, built.model.recompute_method, built.model.recompute_num_layers) == ("full", "block", 2)
    o = model_options(built)
    assert (o.recompute, o.recompute_method, o.recompute_num_layers, o.recompute_modules) == ("full", "block", 2, None)
    assert MC.chosen_recompute(load_config(None, []), p) == load_config(None, [])  # not auto: the config itself



@pytest.mark.parametrize("gpus, offload", [(1, False), (1, True), (2, False), (8, True)])
def test_longest_pair_projection_is_the_plans_boundary(gpus, offload):
    """tools/plan_longest.py (issue #23's projection): the length it reports fits by the plan and one
    granule more does not; more GPUs (CP) never give a shorter pair."""
    from megatron_longpo.models.hf_config import arch_from_hf_config

    tool = _tool("plan_longest")

    arch = arch_from_hf_config(tool.MISTRAL_7B)
    device = P.H200_GIB * P.GIB

    def base(cp):
        return P.PlanInputs(arch, row_tokens=0, scored_tokens=0, cp=cp, recompute="full", grad_dtype="bf16",
                            cpu_offload=offload, offload_fraction=0.75 if offload else 1.0, precision_aware=offload)

    length, pl = tool.longest(base(gpus), device)
    assert length > 0 and length % 8192 == 0
    assert pl.peak <= device
    assert P.plan(tool.pair_inputs(base(gpus), length, 512), device).peak == pl.peak
    assert P.plan(tool.pair_inputs(base(gpus), length + 8192, 512), device).peak > device
    if gpus > 1:
        assert length > tool.longest(base(gpus // 2), device)[0]


def test_a_memory_fraction_caps_the_allocator_and_the_plan_fits_against_the_cap(tmp_path, monkeypatch):
    """train.memory_fraction (jobs sharing a GPU): the plan's verdict and recompute choice are made for the
    capped size, and the trainer caps torch's allocator there; out of range is one line."""
    import json

    from megatron_longpo import platform

    hf = tmp_path / "config.json"
    hf.write_text(json.dumps({**TINY, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
                              "intermediate_size": 14336, "vocab_size": 32000, "num_hidden_layers": 32}))
    keys = ["model.recompute=auto", "data.share_prefix=true", "optim.cpu_offload=true", "optim.grad_dtype=bf16"]
    whole = MC.plan_command(load_config(None, keys), length=32768, hf_config=str(hf), device_gib=160)
    half = MC.plan_command(load_config(None, keys + ["train.memory_fraction=0.5"]), length=32768, hf_config=str(hf),
                           device_gib=160)
    assert "GPU(s) of 160.0 GiB, capped at 0.5 of it (80.0 GiB)" in half
    assert half.split("memory plan")[1] == MC.plan_command(load_config(None, keys), length=32768, hf_config=str(hf),
                                                           device_gib=80).split("memory plan")[1]
    assert whole.split("memory plan")[1] != half.split("memory plan")[1]  # less room: more recompute
    for bad in ("0", "1.5"):
        with pytest.raises(ConfigError, match=r"train.memory_fraction must be in \(0, 1\]"):
            load_config(None, [f"train.memory_fraction={bad}"])

    calls = []
    assert platform.limit_gpu_memory(0.47) is (torch.cuda.is_available())  # the CPU: nothing to cap
    monkeypatch.setattr(platform, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, *a: calls.append(f))
    assert platform.limit_gpu_memory(None) is False and calls == []
    assert platform.limit_gpu_memory(0.47) is True and calls == [0.47]

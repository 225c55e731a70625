"""kv_decode (the transformers backend's default decoder) against `model.generate()` on the trained
SmolLM2: the same greedy tokens, prefix sharing that skips work without changing them, and the
sampling filter; graph_decode's static step (the fast path's decoder on a GPU, run here without
capture) against generate() on a tiny random Llama."""

import pytest
import torch

from megatron_longpo.generation.backends import SamplingParams

DOC = ("The harbour of Corran Point was dredged in 1871, and its lighthouse stands 41 metres tall. "
       "The ferry keeper, Mara Velin, kept the tide tables for thirty years. ") * 6


def _convs():
    qs = ["How tall is the lighthouse?", "Who kept the tide tables?", "When was the harbour dredged?"]
    convs = [[{"role": "user", "content": f"{DOC}\n\n{q}"}] for q in qs]  # one document, three questions
    convs += [[{"role": "user", "content": "Name three colours."}], [{"role": "user", "content": "Count to five."}]]
    return convs


def test_greedy_tokens_equal_generate_and_the_prefix_is_prefilled_once(smollm2_dir):
    from megatron_longpo.generation.transformers_backend import TransformersBackend

    fast = TransformersBackend(str(smollm2_dir), device="cpu", dtype="float32", threads=2, batch_size=8)
    assert fast.decode == "prefill"
    slow = TransformersBackend(str(smollm2_dir), device="cpu", dtype="float32", threads=2, batch_size=8,
                               decode="generate")
    params = SamplingParams(max_new_tokens=24)
    convs = _convs()
    a, b = fast.chat(convs, params), slow.chat(convs, params)
    assert a == b, (a, b)
    assert all(len(x[0]) > 0 for x in a)
    st = fast.decode_stats
    lengths = [len(fast._prompt_ids(c)) for c in convs]
    assert st.prompts == 5 and st.prompt_tokens == sum(lengths)
    # the three document prompts share ~all of the document: two of them prefill only their question
    doc_len = min(lengths[:3])
    assert st.prefilled_tokens < sum(lengths) - 2 * (doc_len - 20), (st, lengths)


def test_rows_decode_as_if_alone(smollm2_dir):
    """A batch of prompts of very different lengths (left padding of hundreds of positions) gives each
    row the tokens it gets in a batch of one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_longpo.generation import kv_decode

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    prompts = [tok(t).input_ids for t in (DOC * 2, "Hello", DOC[:200])]
    eos = [tok.eos_token_id]
    together = kv_decode.decode_batch(model, prompts, 16, eos, tok.pad_token_id or 0)
    alone = [kv_decode.decode_batch(model, [p], 16, eos, tok.pad_token_id or 0)[0] for p in prompts]
    assert together == alone
    ref = model.generate(input_ids=torch.tensor([prompts[0]]), max_new_tokens=16, do_sample=False,
                         eos_token_id=eos, pad_token_id=tok.pad_token_id)[0, len(prompts[0]):].tolist()
    assert alone[0] == [t for t in ref if t not in eos][: len(alone[0])] and len(alone[0]) == len(
        [t for t in ref if t not in eos])


def test_top_p_keeps_the_smallest_set_reaching_p():
    from megatron_longpo.generation.kv_decode import _sample

    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(20000, 1)
    draws = _sample(logits, temperature=1.0, top_p=0.6)
    counts = torch.bincount(draws, minlength=4).double() / draws.numel()
    assert counts[2] == 0 and counts[3] == 0  # 0.5 < 0.6 needs the second token; 0.8 >= 0.6 stops there
    assert abs(counts[0].item() - 0.5 / 0.8) < 0.02
    assert torch.equal(_sample(logits[:3], 0.0, 1.0), torch.zeros(3, dtype=torch.long))


def test_decode_batches_respect_the_key_value_budget():
    from megatron_longpo.generation.transformers_backend import plan_decode_batches

    lengths = [1000, 16000, 16000, 3000, 16000, 100]
    plan = plan_decode_batches(lengths, batch_size=4, token_budget=40000, max_new_tokens=256)
    assert sorted(i for b in plan for i in b) == list(range(6))
    assert all(len(b) == 1 or len(b) * (max(lengths[i] for i in b) + 256) <= 40000 for b in plan)
    assert [[lengths[i] for i in b] for b in plan] == [[100, 1000, 3000], [16000, 16000], [16000]]
    assert plan_decode_batches([5] * 5, batch_size=2, token_budget=None, max_new_tokens=1) == [[0, 1], [2, 3], [4]]


def test_a_sliding_window_model_falls_back_to_generate():
    """kv_decode lays whole caches side by side: a model with an active sliding window (Mistral
    v0.1's 4096) is not its kind, so `supported` names why (and the backend uses generate())."""
    from types import SimpleNamespace

    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from megatron_longpo.generation.kv_decode import supported

    assert "sliding window (4096)" in supported(SimpleNamespace(config=MistralConfig(sliding_window=4096)))
    assert supported(SimpleNamespace(config=MistralConfig(sliding_window=None))) is None
    assert supported(SimpleNamespace(config=Qwen2Config(sliding_window=4096, use_sliding_window=False))) is None
    assert supported(SimpleNamespace(config=LlamaConfig())) is None


@pytest.fixture(scope="module")
def tiny_model(smollm2_dir, tmp_path_factory):
    """A random 2-layer Llama (hidden 64, 4 query heads on 2 key/value heads) in fp32: seconds a test."""
    from fixtures import tiny_hf_model
    from transformers import AutoModelForCausalLM

    path = tiny_hf_model(tmp_path_factory.mktemp("tiny_decode") / "hf", smollm2_dir, "llama", layers=2)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _generate(model, prompt, budget, eos):
    """generate()'s greedy tokens for one prompt alone, cut before the end of sequence."""
    from megatron_longpo.generation.kv_decode import cut_at_eos

    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=budget, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return cut_at_eos([out[0, len(prompt):].tolist()], eos)[0]


def test_static_step_gives_generates_tokens(tiny_model):
    """The static step (the CUDA graphs' code, run eagerly) against generate() on each prompt alone, in
    fp32 on the CPU: prompts of different lengths (left padding), a row that ends on its end of sequence
    while others use the whole budget, padding rows, a capacity far beyond the batch's (masked columns),
    and one decoder over batches that grow its buffers and then reuse them (stale columns masked)."""
    from megatron_longpo.generation import graph_decode, kv_decode

    model, budget = tiny_model, 12
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 49000, (n,), generator=g).tolist() for n in (37, 5, 18, 26, 9)]
    free = _generate(model, prompts[1], budget, [49151])
    eos = [next(t for j, t in enumerate(free) if j >= 3 and t not in free[:j])]  # row 1 stops after 3+ tokens
    ref = [_generate(model, p, budget, eos) for p in prompts]
    assert 3 <= len(ref[1]) < budget and any(len(r) == budget for r in ref), ref

    assert kv_decode.decode_batch(model, prompts, budget, eos, 0) == ref
    exact = graph_decode.StaticDecoder(model, kv_decode.Prefiller(model), graphs=False, check_every=1,
                                       row_multiple=1, cap_multiple=1)
    calls = graph_decode._CALLS[0]
    assert exact(prompts, budget, eos, 0) == ref
    assert graph_decode._CALLS[0] > calls  # the step's own attention ran (the query heads packed per kv head)
    assert model.config._attn_implementation == "sdpa"  # and the model's is back
    padded = graph_decode.StaticDecoder(model, kv_decode.Prefiller(model), graphs=False, check_every=4,
                                        cap_multiple=512)  # 5 rows -> 8, 49 columns -> 512
    assert padded(prompts[2:4], budget, eos, 0) == ref[2:4]  # buffers for 2 rows x 512
    assert padded(prompts, budget, eos, 0) == ref  # grown to 8 x 512
    assert padded(prompts[:1] + prompts[4:], budget, eos, 0) == [ref[0], ref[4]]  # reused: stale keys masked
    st = padded.stats
    assert (st.batches, st.rows, st.padded_rows, st.graphs) == (3, 9, 3, 0)
    assert st.decode_steps > 0 and st.prefill_s > 0 and st.decode_s > 0


def test_prompts_prefilled_together_right_padded_give_generates_tokens(tiny_model):
    """The GPU's prefill, run on the CPU in fp32: prompts of different lengths prefilled several a call,
    right-padded to a multiple of 16 within 256 tokens a call; a prompt sharing a 70-token prefix with
    the last prompt of a call keeps that prefix (the rest prefilled alone after it). The greedy tokens
    of both decoders are generate()'s on each prompt alone."""
    from megatron_longpo.generation import graph_decode, kv_decode

    model, budget, eos = tiny_model, 6, [49151]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, 49000, (n,), generator=g).tolist() for n in (37, 5, 75, 26, 9, 40, 18)]
    prompts[3] = prompts[2][:70] + prompts[3]  # shares 70 tokens with prompt 2
    ref = [_generate(model, p, budget, eos) for p in prompts]
    pre = kv_decode.Prefiller(model, batch_tokens=256, multiple=16)
    assert kv_decode.decode_batch(model, prompts, budget, eos, 0, prefiller=pre) == ref
    st = pre.stats
    # calls: [37, 5, 75] padded to 80 (240 tokens), [70 kept + 26], [9, 40, 18] padded to 48 (144)
    assert (st.prompts, st.prefill_calls) == (7, 3), st
    assert st.prefilled_tokens == sum(map(len, prompts)) - 70
    assert st.padded_tokens == (240 - 117) + (144 - 67)
    static = graph_decode.StaticDecoder(model, kv_decode.Prefiller(model, batch_tokens=256, multiple=16), graphs=False,
                                        check_every=1, row_multiple=1, cap_multiple=1)
    assert static(prompts, budget, eos, 0) == ref
    with pytest.raises(ValueError, match="batch_tokens -1: give 0"):
        kv_decode.Prefiller(model, batch_tokens=-1)


def test_decode_step_choice_and_buckets(tiny_model):
    from megatron_longpo.generation import graph_decode

    assert graph_decode.choose(tiny_model, "auto") == "eager"  # the CPU: no graphs
    assert graph_decode.choose(tiny_model, "static") == "static"
    with pytest.raises(ValueError, match="CUDA graphs need a GPU"):
        graph_decode.choose(tiny_model, "graph")
    assert graph_decode.bucket(1, 100) == (1, 1024)
    assert graph_decode.bucket(5, 1025) == (8, 2048)
    assert [graph_decode.bucket(n, 16384)[0] for n in (31, 56, 57, 62, 64)] == [32, 56, 64, 64, 64]


def test_the_decode_budget_is_the_cards_free_memory_or_the_processs_cap():
    """Key/value positions a decode batch may hold: half the memory this process can still get, which is
    the card's free memory plus torch's own cache, or, with a cap (jobs sharing the GPU), the room under it."""
    from types import SimpleNamespace

    from megatron_longpo.generation.transformers_backend import TransformersBackend

    gib = 2**30
    cap = [1.0]  # torch's per-process fraction (platform.limit_gpu_memory sets it)
    cuda = SimpleNamespace(mem_get_info=lambda d: (60 * gib, 80 * gib), memory_reserved=lambda d: 10 * gib,
                           memory_allocated=lambda d: 4 * gib, get_per_process_memory_fraction=lambda d: cap[0],
                           get_device_properties=lambda d: SimpleNamespace(total_memory=80 * gib))
    fake = SimpleNamespace(device="cuda:0", kv_memory_fraction=0.5, kv_bytes_per_token=lambda: 2**20,
                           torch=SimpleNamespace(cuda=cuda, device=lambda d: d))
    assert TransformersBackend._token_budget(fake) == (60 + 10 - 4) * 1024 // 2  # the card's free memory and the cache
    cap[0] = 0.25
    assert TransformersBackend._token_budget(fake) == (20 - 4) * 1024 // 2  # the cap (a quarter of 80) less what it holds
    fake.device = "cpu"
    assert TransformersBackend._token_budget(fake) is None

"""Batched decoding of prompts that were prefilled one at a time (the transformers backend's fast path).

`model.generate()` over a left-padded batch prefills every prompt together: SDPA is then handed a
padded [batch, 1, L, L] mask (and makes a float copy of it), so long prompts force tiny batches, and a
dynamic cache re-copies itself at every new token. Here instead:

1. prompts are prefilled causal and unmasked (SDPA's fused kernels), one a call, or with
   `batch_tokens` (the evaluation's `--prefill-tokens`; `prefill_tokens()`: on a GPU) several a call, right-padded to a common length
   that is a multiple of PREFILL_MULTIPLE on a GPU (causal attention: a prompt's positions never see
   the padding after them, so its keys, values and last logits are the ones it has alone; the few
   padded shapes let SDPA's cuDNN kernel keep its plans), up to `batch_tokens` padded tokens a call.
   A prompt that shares a token prefix with the one before it (the same document, another question)
   keeps that prefix's keys and values and prefills only the rest, alone;
2. the prompts' keys and values are laid side by side, left-padded, in one buffer per layer allocated
   once for prompt + new tokens (`SlotLayer`: no copy per token);
3. the batch decodes together; each step's mask is [batch, 1, 1, L], and each row has its own
   position ids, so a row's tokens are exactly those it would get alone.

Greedy outputs equal `generate()`'s (tests/test_kv_decode.py, fp32 on the CPU). Sampling draws from
the same distribution (temperature, then top-p), not the same random stream.

Each step here is a Python call of the whole model over views that grow; on a GPU the fast path
decodes greedily with graph_decode.py instead (fixed shapes, one captured CUDA graph a step).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import time

import torch

MIN_SHARED_PREFIX = 64  # shorter common prefixes are prefilled again (not worth the copy)
PREFILL_MULTIPLE = 256  # GPU, several prompts a call: the call's common length is a multiple of this
# The evaluation's tokens a prefill call on a GPU. Measured on one H100 80GB (SmolLM2-135M, bf16, RULER's
# 13 tasks x 31 at each length, examples/eval_speed/results/h100_prefill_batched.json): against one
# prompt a call, 1.8x samples/s at 4K, 1.17x at 8K, 1.16x at 16K, scores equal on 391/395/402 of 403.
GPU_PREFILL_TOKENS = 32768


def prefill_tokens(device, asked: int | None = None) -> int:
    """The evaluation's tokens a prefill call: `asked` (its --prefill-tokens) when given, else
    GPU_PREFILL_TOKENS on a GPU and 0 on the CPU (one prompt a call; batching was not measured to gain
    there)."""
    if asked is not None:
        return asked
    return GPU_PREFILL_TOKENS if str(device).startswith("cuda") else 0


def supported(model) -> str | None:
    """None when this path can decode `model`, else why not (the caller falls back to `generate()`)."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer  # noqa: F401
    except ImportError:
        return "this transformers has no DynamicLayer (needs >= 4.56)"
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return f"{type(cfg).__name__} has a sliding window ({cfg.sliding_window})"
    if not hasattr(DynamicCache(), "layers"):
        return "this transformers' DynamicCache has no per-layer objects"
    return None


@lru_cache(maxsize=None)
def _slot_layer_class():
    from transformers.cache_utils import DynamicLayer

    class SlotLayer(DynamicLayer):
        """One layer's keys and values for a whole batch, allocated once for `capacity` positions;
        `update` writes the step's token in place and returns views of the filled part."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, filled: int) -> None:
            super().__init__()
            self.buf_k, self.buf_v, self.filled = keys, values, filled
            self.device = keys.device
            self.is_initialized = True
            self.keys, self.values = keys[:, :, :filled], values[:, :, :filled]

        def lazy_initialization(self, key_states, value_states) -> None:  # already allocated
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            n = key_states.shape[-2]
            if self.filled + n > self.buf_k.shape[-2]:
                raise RuntimeError(f"decode buffer full ({self.buf_k.shape[-2]} positions)")
            self.buf_k[:, :, self.filled:self.filled + n] = key_states
            self.buf_v[:, :, self.filled:self.filled + n] = value_states
            self.filled += n
            self.keys, self.values = self.buf_k[:, :, :self.filled], self.buf_v[:, :, :self.filled]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.filled

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.filled + query_length, 0

    return SlotLayer


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _forward_names(model) -> tuple[str, dict]:
    """The cache keyword of `model.forward` (`cache` from transformers 5.2x, `past_key_values` before)
    and the keyword that computes only the last position's logits, where there is one."""
    import inspect

    params = inspect.signature(model.forward).parameters
    cache = "cache" if "cache" in params else "past_key_values"
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return cache, {name: 1}
    return cache, {}


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def prefill_attention_kernels(device, bucketed: bool = False):
    """SDPA's kernels for a prefill on a GPU. `bucketed` (a call whose length is a multiple of
    PREFILL_MULTIPLE, causal, no mask): cuDNN first (on an H100 at 16K tokens, one layer's attention of
    SmolLM2's shape: 0.70 ms against flash's 1.18). Otherwise (the rest of a prompt after a kept prefix,
    its own length, through a mask) without cuDNN, which builds an execution plan for each new shape
    (tens of milliseconds, more than the attention itself for a small model). A no-op on the CPU."""
    from contextlib import nullcontext

    if torch.device(device).type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(([SDPBackend.CUDNN_ATTENTION] if bucketed else []) + kernels)


@dataclass
class DecodeStats:
    """What the prefill and the decode loop did, and where the time went (seconds measured with the
    device synchronised at each boundary: once a batch, after its prefill and after its last step)."""

    prompts: int = 0
    prompt_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens actually run (the rest came from a shared prefix)
    prefill_calls: int = 0  # model calls of the prefill (several prompts a call with Prefiller's batch_tokens)
    padded_tokens: int = 0  # tokens added to bring a call's prompts to one length
    batches: int = 0
    rows: int = 0
    padded_rows: int = 0  # rows added to reach a captured batch size (graph_decode)
    decode_steps: int = 0  # model calls after the prefill (one new token for every row of a batch)
    prefill_s: float = 0.0  # prompts prefilled and laid into the batch's buffers
    decode_s: float = 0.0  # the decode loop, until the batch's tokens are on the host
    capture_s: float = 0.0  # CUDA graphs warmed up and captured (graph_decode)
    graphs: int = 0  # CUDA graphs captured

    def to_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in vars(self).items()}


def sync(device) -> None:
    """Wait for the device (CUDA's kernels are asynchronous: a timer must not stop before them)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Prefiller:
    """Prefills prompts (`rows`: one a call, or with `batch_tokens` > 0 several a call, right-padded to a
    common length that is a multiple of `multiple` -- default PREFILL_MULTIPLE on a GPU, 1 on the CPU --
    within `batch_tokens` tokens a call), reusing the previous prompt's cache for a common token prefix
    when that prefix is at least `min_shared` of the prompt (default: any, on the CPU; half, on a GPU).
    On a GPU the rest of a prompt attends to a kept prefix through a materialised mask, which SDPA runs
    with a slower kernel than the causal flash kernel of a whole prompt: RULER at 16K tokens (needles at
    every depth: neighbouring prompts share the haystack up to the first needle), 403 prompts on one
    H100, prefilled in 53.1 s reusing every shared prefix and in 26.4 s reusing none. A prompt that shares
    most of its tokens (another question on the same document) still gains."""

    def __init__(self, model, stats: DecodeStats | None = None, min_shared: float | None = None,
                 batch_tokens: int = 0, multiple: int | None = None) -> None:
        self.model = model
        self.stats = stats or DecodeStats()
        cuda = model.device.type == "cuda"
        self.min_shared = (0.5 if cuda else 0.0) if min_shared is None else min_shared
        self.cache_kw, self._kw = _forward_names(model)
        if batch_tokens < 0:
            raise ValueError(f"batch_tokens {batch_tokens}: give 0 (one prompt a call) or a token count")
        self.batch_tokens = batch_tokens
        if not self._kw:  # no way to keep only some positions' logits: [rows, length, vocab] is too much
            self.batch_tokens = 0
        self.multiple = max(1, (PREFILL_MULTIPLE if cuda else 1) if multiple is None else multiple)
        self._ids: list[int] | None = None
        self._cache = None

    def _reuses(self, prev: list[int] | None, ids: list[int]) -> int:
        """The shared prefix `ids` would keep from `prev`'s cache (0: none)."""
        shared = min(common_prefix(prev, ids), len(ids) - 1) if prev is not None else 0
        return shared if shared >= max(MIN_SHARED_PREFIX, self.min_shared * len(ids)) else 0

    def _padded(self, n: int) -> int:
        return -(-n // self.multiple) * self.multiple

    def rows(self, prompts: Sequence[list[int]]):
        """Yields (i, last-position logits [vocab], [(keys, values)] a layer, each [1, kv heads, len(prompt i),
        head size]) for every prompt in order. The tensors are only valid until the next item."""
        i = 0
        while i < len(prompts):
            if not self.batch_tokens or self._reuses(self._ids, prompts[i]):
                logits, cache = self(prompts[i])
                n = len(prompts[i])
                yield i, logits, [(k[:, :, :n], v[:, :, :n]) for k, v in _layers(cache)]
                i += 1
                continue
            j, width = i + 1, self._padded(len(prompts[i]))
            while j < len(prompts) and not self._reuses(prompts[j - 1], prompts[j]):
                w = max(width, self._padded(len(prompts[j])))
                if (j - i + 1) * w > self.batch_tokens:
                    break
                j, width = j + 1, w
            yield from self._together(prompts[i:j], width, i)
            i = j

    def _together(self, group: Sequence[list[int]], width: int, first: int):
        """Prefill `group` in one call, right-padded to `width` (causal: the padding is after every
        position that is kept)."""
        from transformers.cache_utils import DynamicCache

        dev = self.model.device
        ids = torch.zeros(len(group), width, dtype=torch.long, device=dev)
        for r, p in enumerate(group):
            ids[r, :len(p)] = torch.tensor(p, device=dev)
        last = sorted({len(p) - 1 for p in group})
        keep = {name: torch.tensor(last, device=dev) for name in self._kw}
        cache = DynamicCache()
        with prefill_attention_kernels(dev, bucketed=True):
            out = self.model(input_ids=ids, position_ids=torch.arange(width, device=dev)[None].expand(len(group), -1),
                             use_cache=True, **{self.cache_kw: cache}, **keep)
        layers = _layers(cache)
        st = self.stats
        st.prefill_calls += 1
        for r, p in enumerate(group):
            n = len(p)
            st.prompts += 1
            st.prompt_tokens += n
            st.prefilled_tokens += n
            st.padded_tokens += width - n
            yield first + r, out.logits[r, last.index(n - 1)], [(k[r:r + 1, :, :n], v[r:r + 1, :, :n]) for k, v in layers]
        n = len(group[-1])  # the next prompt may keep the last one's prefix
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[-1:, :, :n], layer.values[-1:, :, :n]
        self._ids, self._cache = list(group[-1]), cache

    def __call__(self, ids: list[int]):
        """(last-position logits [vocab], cache) for `ids`; the cache is only valid until the next call."""
        from transformers.cache_utils import DynamicCache

        dev = self.model.device
        shared = self._reuses(self._ids, ids)
        if shared:
            cache = self._cache
            for layer in cache.layers:  # keep the shared prefix (Cache.crop's argument changed meaning across versions)
                layer.keys, layer.values = layer.keys[:, :, :shared], layer.values[:, :, :shared]
        else:
            shared, cache = 0, DynamicCache()
        rest = torch.tensor([ids[shared:]], device=dev)
        pos = torch.arange(shared, len(ids), device=dev)[None]
        with prefill_attention_kernels(dev):
            out = self.model(input_ids=rest, position_ids=pos, use_cache=True, **{self.cache_kw: cache}, **self._kw)
        self._ids, self._cache = list(ids), cache
        self.stats.prefill_calls += 1
        self.stats.prompts += 1
        self.stats.prompt_tokens += len(ids)
        self.stats.prefilled_tokens += len(ids) - shared
        return out.logits[0, -1], cache

    def reset(self) -> None:
        self._ids = self._cache = None


def _sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1).squeeze(-1)


def prefill_rows(prefiller: Prefiller, prompts: Sequence[list[int]], width: int, alloc) -> tuple[torch.Tensor, list]:
    """Prefill the prompts (`Prefiller.rows`) and lay each one's keys and values in row i of the per-layer
    buffers, left-padded to end at column `width`. `alloc(layers)` makes the buffers [(keys, values)] from
    the first prompt's cache (its heads, head size, dtype). Returns (each row's last-position logits
    [rows, vocab], the buffers)."""
    first: list = [None] * len(prompts)
    bufs = None
    for i, logits, layers in prefiller.rows(prompts):
        first[i] = logits
        if bufs is None:
            bufs = alloc(layers)
        n = len(prompts[i])
        for (bk, bv), (k, v) in zip(bufs, layers):
            bk[i, :, width - n:width] = k[0]
            bv[i, :, width - n:width] = v[0]
    prefiller.reset()
    return torch.stack(first), bufs


def cut_at_eos(rows: list[list[int]], eos_ids: Sequence[int]) -> list[list[int]]:
    """Each row's tokens before its first end-of-sequence token."""
    eos = set(eos_ids)
    return [row[:next((j for j, x in enumerate(row) if x in eos), len(row))] for row in rows]


def decode_batch(model, prompts: Sequence[list[int]], max_new_tokens: int, eos_ids: Sequence[int], pad_id: int,
                 temperature: float = 0.0, top_p: float = 1.0, prefiller: Prefiller | None = None,
                 generator_seed: int | None = None) -> list[list[int]]:
    """New token ids for each prompt (without the end-of-sequence token), decoded as one batch."""
    from transformers.cache_utils import DynamicCache

    SlotLayer = _slot_layer_class()
    dev = model.device
    prefiller = prefiller or Prefiller(model)
    stats = prefiller.stats
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    B, W = len(prompts), max(len(p) for p in prompts)
    cap = W + max_new_tokens
    t0 = time.perf_counter()
    with torch.no_grad():
        first, bufs = prefill_rows(prefiller, prompts, W, lambda layers: [
            (k.new_zeros(B, k.shape[1], cap, k.shape[3]), v.new_zeros(B, v.shape[1], cap, v.shape[3]))
            for k, v in layers])
        sync(dev)
        t1 = time.perf_counter()
        batch_cache = DynamicCache()
        batch_cache.layers = [SlotLayer(k, v, W) for k, v in bufs]
        mask = torch.zeros(B, cap, dtype=torch.long, device=dev)
        for i, ids in enumerate(prompts):
            mask[i, W - len(ids):W] = 1
        pos = torch.tensor([len(p) for p in prompts], device=dev)
        eos = torch.tensor(sorted(set(eos_ids)), device=dev)
        tok = _sample(first, temperature, top_p)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        steps = []
        for t in range(max_new_tokens):
            tok = torch.where(done, torch.full_like(tok, pad_id), tok)
            steps.append(tok)
            done = done | torch.isin(tok, eos)
            if t == max_new_tokens - 1 or bool(done.all()):
                break
            mask[:, W + t] = 1
            out = model(input_ids=tok[:, None], attention_mask=mask[:, :W + t + 1], position_ids=(pos + t)[:, None],
                        use_cache=True, **{prefiller.cache_kw: batch_cache})
            tok = _sample(out.logits[:, -1], temperature, top_p)
        del batch_cache, bufs
    cols = torch.stack(steps, dim=1).tolist()
    stats.batches += 1
    stats.rows += B
    stats.decode_steps += len(steps) - 1
    stats.prefill_s += t1 - t0
    stats.decode_s += time.perf_counter() - t1
    return cut_at_eos(cols, eos_ids)

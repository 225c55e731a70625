"""Batched decoding of prompts that were prefilled one at a time (the transformers backend's fast path).

`model.generate()` over a left-padded batch prefills every prompt together: SDPA is then handed a
padded [batch, 1, L, L] mask (and makes a float copy of it), so long prompts force tiny batches, and a
dynamic cache re-copies itself at every new token. Here instead:

1. each prompt is prefilled alone, causal and unmasked (SDPA's fused kernels); a prompt that shares a
   token prefix with the one before it (the same document, another question) keeps that prefix's keys
   and values and prefills only the rest;
2. the prompts' keys and values are laid side by side, left-padded, in one buffer per layer allocated
   once for prompt + new tokens (`SlotLayer`: no copy per token);
3. the batch decodes together; each step's mask is [batch, 1, 1, L], and each row has its own
   position ids, so a row's tokens are exactly those it would get alone.

Greedy outputs equal `generate()`'s (tests/test_kv_decode.py, fp32 on the CPU). Sampling draws from
the same distribution (temperature, then top-p), not the same random stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

MIN_SHARED_PREFIX = 64  # shorter common prefixes are prefilled again (not worth the copy)


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


@dataclass
class PrefillStats:
    prompts: int = 0
    prompt_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens actually run (the rest came from a shared prefix)


class Prefiller:
    """Prefills prompts one at a time, reusing the previous prompt's cache for a common token prefix."""

    def __init__(self, model, stats: PrefillStats | None = None) -> None:
        self.model = model
        self.stats = stats or PrefillStats()
        self._ids: list[int] | None = None
        self._cache = None
        self.cache_kw, self._kw = _forward_names(model)

    def __call__(self, ids: list[int]):
        """(last-position logits [vocab], cache) for `ids`; the cache is only valid until the next call."""
        from transformers.cache_utils import DynamicCache

        dev = self.model.device
        shared = common_prefix(self._ids, ids) if self._ids is not None else 0
        shared = min(shared, len(ids) - 1)
        if shared >= MIN_SHARED_PREFIX:
            cache = self._cache
            for layer in cache.layers:  # keep the shared prefix (Cache.crop's argument changed meaning across versions)
                layer.keys, layer.values = layer.keys[:, :, :shared], layer.values[:, :, :shared]
        else:
            shared, cache = 0, DynamicCache()
        rest = torch.tensor([ids[shared:]], device=dev)
        pos = torch.arange(shared, len(ids), device=dev)[None]
        out = self.model(input_ids=rest, position_ids=pos, use_cache=True, **{self.cache_kw: cache}, **self._kw)
        self._ids, self._cache = list(ids), cache
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


def decode_batch(model, prompts: Sequence[list[int]], max_new_tokens: int, eos_ids: Sequence[int], pad_id: int,
                 temperature: float = 0.0, top_p: float = 1.0, prefiller: Prefiller | None = None,
                 generator_seed: int | None = None) -> list[list[int]]:
    """New token ids for each prompt (without the end-of-sequence token), decoded as one batch."""
    from transformers.cache_utils import DynamicCache

    SlotLayer = _slot_layer_class()
    dev = model.device
    prefiller = prefiller or Prefiller(model)
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    B, W = len(prompts), max(len(p) for p in prompts)
    cap = W + max_new_tokens
    first = []
    bufs: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            logits, cache = prefiller(ids)
            first.append(logits)
            layers = _layers(cache)
            if bufs is None:
                bufs = [(k.new_zeros(B, k.shape[1], cap, k.shape[3]), v.new_zeros(B, v.shape[1], cap, v.shape[3]))
                        for k, v in layers]
            n = len(ids)
            for (bk, bv), (k, v) in zip(bufs, layers):
                bk[i, :, W - n:W] = k[0, :, :n]
                bv[i, :, W - n:W] = v[0, :, :n]
        prefiller.reset()
        batch_cache = DynamicCache()
        batch_cache.layers = [SlotLayer(k, v, W) for k, v in bufs]
        mask = torch.zeros(B, cap, dtype=torch.long, device=dev)
        for i, ids in enumerate(prompts):
            mask[i, W - len(ids):W] = 1
        pos = torch.tensor([len(p) for p in prompts], device=dev)
        eos = torch.tensor(sorted(set(eos_ids)), device=dev)
        tok = _sample(torch.stack(first), temperature, top_p)
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
    eos_set = set(eos_ids)
    result = []
    for row in cols:
        cut = next((j for j, x in enumerate(row) if x in eos_set), len(row))
        result.append(row[:cut])
    return result

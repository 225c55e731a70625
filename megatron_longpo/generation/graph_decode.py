"""Greedy decoding over fixed-shape buffers, each step replayed from a captured CUDA graph (the fast
path's decoder on a GPU).

kv_decode.decode_batch runs every step as a Python call of the whole model (a few hundred kernel
launches for one token a row), over cache views that grow and a mask rebuilt each time. Here every
tensor a step touches keeps its shape and address for the whole batch:

- keys and values: one buffer per layer, [rows, kv heads, cap, head size]; the step writes its token
  at the column held in a device tensor (`index_copy_`) and attends over the whole buffer;
- the mask: [rows, 1, 1, cap], additive (0 where the row has a token; the dtype's minimum on the left
  padding and on the columns not written yet), handed to the model as it is (transformers'
  create_causal_mask returns a 4-D mask unchanged); the step opens its own column in place;
- the token fed, each row's position, the write column and each row's done flag: device tensors the
  step updates in place (argmax; a finished row gets the pad token; end of sequence by table lookup).

No step reads anything back to the host, so on CUDA one step is captured with torch.cuda.CUDAGraph
(after a warm-up on a side stream) and replayed; the host reads `done` every `check_every` steps and
cuts each row after its end of sequence, as kv_decode does. Shapes are bucketed -- rows to a power of
two up to 8, then a multiple of 8 (the extra rows are done from the start); capacity to a multiple of
1024 (the extra columns stay masked) -- so an evaluation captures a handful of graphs. They share one
key/value allocation per layer (views of the largest shape) and one memory pool; `close()` frees them.

Attention: transformers' SDPA call, given a mask, repeats each key/value head for its query heads (a
copy of the whole cache, per layer and step, on transformers 5.17); the step's attention (`_attention`)
lays the query heads that share a key/value head as that head's query rows instead: the same products.

Greedy only. `graphs=False` is the same code without capture: the reference the graphs are checked
against (tools/bench_eval.py --compare-step static), and what runs on the CPU in tests/test_kv_decode.py,
where it gives generate()'s tokens in fp32.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

from . import kv_decode

STEPS = ("auto", "graph", "static", "eager")
ROW_MULTIPLE = 8
CAP_MULTIPLE = 1024
CHECK_EVERY = 8
WARMUP_STEPS = 2
ATTENTION = "megatron_longpo_decode"  # the step's attention, registered with transformers' AttentionInterface
_SAID: set[str] = set()
_CALLS = [0]  # calls of the step's attention (Python calls: eager steps, warm-ups and captures, not replays)


def say_once(key: str, line: str) -> None:
    """Print `line` on stderr the first time `key` is said in this process."""
    if key not in _SAID:
        _SAID.add(key)
        print(line, file=sys.stderr, flush=True)


def bucket(rows: int, positions: int, row_multiple: int = ROW_MULTIPLE, cap_multiple: int = CAP_MULTIPLE
           ) -> tuple[int, int]:
    """(rows, capacity) of the buffers and graph that decode `rows` rows needing `positions` each."""
    r = 1 << (rows - 1).bit_length() if rows <= row_multiple else -(-rows // row_multiple) * row_multiple
    return r, -(-positions // cap_multiple) * cap_multiple


def supported(model) -> str | None:
    """None when the static step can decode `model`, else why not (kv_decode's eager steps can)."""
    why = kv_decode.supported(model)
    if why:
        return why
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        return f"its attention ({impl}) takes no additive [rows, 1, 1, capacity] mask"
    return None


def choose(model, step: str) -> str:
    """The decode step to run: `graph` (static buffers, CUDA graphs), `static` (the same, no capture),
    or `eager` (kv_decode.decode_batch). `auto`: graph on CUDA where `supported`, else eager. Says once
    (stderr) which one runs."""
    if step not in STEPS:
        raise ValueError(f"decode step {step!r}: choose {', '.join(STEPS)}")
    cuda = model.device.type == "cuda"
    why = supported(model)
    if step in ("graph", "static") and why:
        raise ValueError(f"decode step {step}: {why}; use eager")
    if step == "graph" and not cuda:
        raise ValueError(f"decode step graph: the model is on {model.device}, CUDA graphs need a GPU; use static")
    if step == "auto":
        step = "graph" if cuda and not why else "eager"
        reason = "" if step == "graph" else f" ({why or 'not on a GPU'})"
    else:
        reason = " (as asked)"
    say_once(step, {"graph": "decode: static buffers, one CUDA graph a step",
                    "static": "decode: static buffers, steps run eagerly (no CUDA graphs)",
                    "eager": "decode: kv_decode's eager steps"}[step] + reason)
    return step


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA for one query token a row: queries [rows, heads, 1, d] as [rows, kv heads, heads per kv
    head, d] (query head h reads key/value head h // group, as transformers' repeat_kv lays them), the
    mask [rows, 1, 1, cap] broadcast over both. Returns [rows, 1, heads, d] like transformers' own."""
    for name in ("softcap", "sliding_window", "sinks", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:  # not done here: refuse rather than ignore
            raise NotImplementedError(f"graph_decode's attention has no {name}")
    _CALLS[0] += 1
    b, h, q, d = query.shape
    if q != 1:
        raise ValueError(f"graph_decode's attention takes one query token a row, not {q}")
    g = key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(query.reshape(b, g, h // g, d), key, value,
                                                           attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, h, 1, out.shape[-1]).transpose(1, 2).contiguous(), None


@lru_cache(maxsize=None)
def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, _attention)


@contextmanager
def _step_attention(model):
    """While a step runs (eagerly, in the warm-up or under capture), the model's sdpa configs name the
    step's attention; eager attention adds the mask as it is and stays."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None),
                                                                          "_attn_implementation")}
    swapped = [c for c in configs.values() if c._attn_implementation == "sdpa"]
    if swapped:
        _register_attention()
    try:
        for c in swapped:
            c._attn_implementation = ATTENTION
        yield bool(swapped)
    finally:
        for c in swapped:
            c._attn_implementation = "sdpa"


@lru_cache(maxsize=None)
def _static_layer_class():
    from transformers.cache_utils import DynamicLayer

    class StaticSlotLayer(DynamicLayer):
        """One layer's keys and values at a fixed shape: `update` writes the step's token at column
        `col` (a device tensor) and returns the whole buffers."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, col: torch.Tensor) -> None:
            super().__init__()
            self.keys, self.values, self.col = keys, values, col
            self.device = keys.device
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:  # already allocated
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            self.keys.index_copy_(2, self.col, key_states)
            self.values.index_copy_(2, self.col, value_states)
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.keys.shape[-2]

        def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
            return self.keys.shape[-2], 0

    return StaticSlotLayer


@dataclass
class _Slot:
    """The static tensors of one (rows, capacity) bucket, and its captured step on CUDA."""

    cache: object  # a DynamicCache of StaticSlotLayer over views of the decoder's key/value allocation
    mask: torch.Tensor  # [rows, 1, 1, cap], additive
    tok: torch.Tensor  # [rows, 1]: the token the next step feeds (the last one emitted)
    pos: torch.Tensor  # [rows, 1]: its position
    col: torch.Tensor  # [1]: the column the next step writes
    done: torch.Tensor  # [rows]: the row has emitted its end of sequence (or is padding)
    graph: torch.cuda.CUDAGraph | None = None


class StaticDecoder:
    """Greedy batches over fixed-shape buffers (see the module's docstring); one per evaluation stream,
    `close()` at its end. `graphs`: capture each bucket's step on CUDA (a capture that raises is said in
    one line, and the rest decodes without graphs)."""

    def __init__(self, model, prefiller: kv_decode.Prefiller, graphs: bool, check_every: int = CHECK_EVERY,
                 row_multiple: int = ROW_MULTIPLE, cap_multiple: int = CAP_MULTIPLE) -> None:
        why = supported(model)
        if why:
            raise ValueError(f"static decode: {why}")
        if graphs and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a GPU, not {model.device}")
        self.model, self.prefiller, self.graphs = model, prefiller, graphs
        self.stats = prefiller.stats
        self.check_every, self.row_multiple, self.cap_multiple = max(1, check_every), row_multiple, cap_multiple
        self.device = model.device
        self._kw = dict(prefiller._kw)  # logits of the last position only
        vocab = model.get_output_embeddings().weight.shape[0]
        self._is_eos = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        self._pad = torch.zeros((), dtype=torch.long, device=self.device)
        self._arena: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer, flat keys and values
        self._reserved = 0  # rows x capacity the allocation is made for at least
        self._slots: dict[tuple[int, int], _Slot] = {}
        self._pool = None

    def reserve(self, batches: Sequence[tuple[int, int]]) -> None:
        """Size the key/value allocation for these (rows, positions) batches at once, so that it is
        made one time and no captured graph is dropped when a larger batch comes."""
        self._reserved = max([self._reserved] + [r * c for r, c in (bucket(n, p, self.row_multiple,
                                                                          self.cap_multiple) for n, p in batches)])

    def close(self) -> None:
        self._slots.clear()
        self._arena = []
        self._pool = None

    def __call__(self, prompts: Sequence[list[int]], max_new_tokens: int, eos_ids: Sequence[int],
                 pad_id: int) -> list[list[int]]:
        """New token ids for each prompt (without the end-of-sequence token), decoded as one batch."""
        B, W = len(prompts), max(len(p) for p in prompts)
        R, cap = bucket(B, W + max_new_tokens, self.row_multiple, self.cap_multiple)
        st = self.stats
        t0, slot = time.perf_counter(), None
        capture0 = st.capture_s

        def alloc(layers):
            nonlocal slot
            slot = self._slot(R, cap, layers)
            return [(layer.keys, layer.values) for layer in slot.cache.layers]

        with torch.no_grad():
            first, _ = kv_decode.prefill_rows(self.prefiller, prompts, W, alloc)
            self._start(slot, first, [len(p) for p in prompts], W, eos_ids, pad_id)
            kv_decode.sync(self.device)
            t1 = time.perf_counter()
            out = torch.empty(R, max_new_tokens, dtype=torch.long, device=self.device)
            out[:, 0] = slot.tok[:, 0]
            n, stop = 1, bool(slot.done.all())
            with nullcontext() if slot.graph is not None else _step_attention(self.model):
                while n < max_new_tokens and not stop:
                    if slot.graph is not None:
                        slot.graph.replay()
                    else:
                        self._step(slot)
                    out[:, n] = slot.tok[:, 0]
                    n += 1
                    if n % self.check_every == 0:
                        stop = bool(slot.done.all())
            rows = out[:B, :n].tolist()
        st.batches += 1
        st.rows += B
        st.padded_rows += R - B
        st.decode_steps += n - 1
        st.prefill_s += t1 - t0 - (st.capture_s - capture0)
        st.decode_s += time.perf_counter() - t1
        return kv_decode.cut_at_eos(rows, eos_ids)

    def _slot(self, R: int, cap: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> _Slot:
        """The bucket's static tensors (views of the key/value allocation, grown if needed), its graph
        captured on first use."""
        if (R, cap) in self._slots:
            return self._slots[(R, cap)]
        shapes = [((R, k.shape[1], cap, k.shape[3]), (R, v.shape[1], cap, v.shape[3])) for k, v in layers]
        if not self._arena or any(math.prod(sk) > ak.numel() or math.prod(sv) > av.numel()
                                  for (sk, sv), (ak, av) in zip(shapes, self._arena)):
            self.close()  # every graph reads the old allocation: drop them with it
            units = max(R * cap, self._reserved)  # rows x positions
            self._arena = [(k.new_zeros(math.prod(sk) // (R * cap) * units),
                            v.new_zeros(math.prod(sv) // (R * cap) * units)) for (sk, sv), (k, v) in zip(shapes, layers)]
        from transformers.cache_utils import DynamicCache

        Layer = _static_layer_class()
        dev, dtype = self.device, layers[0][0].dtype
        col = torch.zeros(1, dtype=torch.long, device=dev)
        cache = DynamicCache()
        cache.layers = [Layer(ak[:math.prod(sk)].view(sk), av[:math.prod(sv)].view(sv), col)
                        for (sk, sv), (ak, av) in zip(shapes, self._arena)]
        slot = _Slot(cache=cache, mask=torch.zeros(R, 1, 1, cap, dtype=dtype, device=dev),  # all open: finite
                     tok=torch.zeros(R, 1, dtype=torch.long, device=dev),
                     pos=torch.zeros(R, 1, dtype=torch.long, device=dev), col=col,
                     done=torch.zeros(R, dtype=torch.bool, device=dev))
        if self.graphs:
            self._capture(slot)
        self._slots[(R, cap)] = slot
        return slot

    def _capture(self, slot: _Slot) -> None:
        t = time.perf_counter()
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            calls = _CALLS[0]
            with torch.cuda.stream(side), _step_attention(self.model) as swapped:
                for _ in range(WARMUP_STEPS):  # the state it leaves is overwritten by _start
                    self._step(slot)
            torch.cuda.current_stream(self.device).wait_stream(side)
            if swapped and _CALLS[0] == calls:  # correct still, but each step copies the cache per query head
                say_once("attention", "decode: transformers did not call the step's attention (it kept its own "
                                      "SDPA call, which repeats keys and values for a masked decode)")
            graph = torch.cuda.CUDAGraph()
            with _step_attention(self.model), torch.cuda.graph(graph, pool=self._pool):
                self._step(slot)
            slot.graph = graph
            self.stats.graphs += 1
        except Exception as e:  # noqa: BLE001 -- whatever it is: say it, and decode on without graphs
            self.graphs = False
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            say_once("capture", f"decode: CUDA graph capture failed ({type(e).__name__}: {msg[:200]}); "
                     f"decoding with the static steps, no graphs")
        kv_decode.sync(self.device)
        self.stats.capture_s += time.perf_counter() - t

    def _start(self, slot: _Slot, first: torch.Tensor, lengths: list[int], W: int, eos_ids: Sequence[int],
               pad_id: int) -> None:
        """Load a batch into the slot: the mask (each row's prompt columns open), the first tokens (the
        prompts' last logits' argmax), positions, the write column, done; padding rows are done."""
        R, cap = slot.mask.shape[0], slot.mask.shape[-1]
        B, dev = len(lengths), self.device
        self._is_eos.zero_()
        self._is_eos[[e for e in set(eos_ids) if 0 <= e < self._is_eos.numel()]] = True
        self._pad.fill_(pad_id)
        lens = torch.tensor(lengths + [1] * (R - B), device=dev)  # a padding row: one open column (finite)
        cols = torch.arange(cap, device=dev)
        open_ = (cols >= W - lens[:, None]) & (cols < W)
        slot.mask.copy_(torch.zeros(R, cap, dtype=slot.mask.dtype, device=dev)
                        .masked_fill_(~open_, torch.finfo(slot.mask.dtype).min)[:, None, None, :])
        tok = torch.full((R,), pad_id, dtype=torch.long, device=dev)
        tok[:B] = first.argmax(-1)
        done = torch.ones(R, dtype=torch.bool, device=dev)
        done[:B] = self._is_eos[tok[:B]]
        slot.tok.copy_(tok[:, None])
        slot.pos.copy_(lens[:, None])
        slot.col.fill_(W)
        slot.done.copy_(done)

    def _step(self, slot: _Slot) -> None:
        """One token for every row, on the device only (what the graph holds)."""
        slot.mask.index_fill_(-1, slot.col, 0.0)
        out = self.model(input_ids=slot.tok, attention_mask=slot.mask, position_ids=slot.pos, use_cache=True,
                         **{self.prefiller.cache_kw: slot.cache}, **self._kw)
        nxt = torch.where(slot.done, self._pad, out.logits[:, -1].argmax(-1))
        slot.done.logical_or_(self._is_eos[nxt])
        slot.tok.copy_(nxt[:, None])
        slot.pos.add_(1)
        slot.col.add_(1)

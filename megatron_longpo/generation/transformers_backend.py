"""`TransformersBackend`: in-process generation with transformers on CPU or GPU, greedy (temperature 0)
or sampled, with an optional RoPE base override.

Two decoders (`decode=`):
- `prefill` (the default where the model allows it): kv_decode.py; each prompt prefilled alone (a
  shared token prefix, e.g. one document asked several questions, is prefilled once), then the batch
  decodes together over a preallocated cache. Batches are as large as `batch_size` and the key/value
  budget allow; no [batch, 1, L, L] mask exists.
- `generate`: `model.generate()` over a left-padded batch (`plan_batches` caps batch x L^2); used
  for models kv_decode does not support (a sliding window).

The evaluation's fast path (eval/fast.py) decodes with this backend's model directly, with the step
`decode_step` names (graph_decode.STEPS; auto: CUDA graphs on a GPU), and counts into `decode_stats`.
"""

from __future__ import annotations

import os
from typing import Sequence

from . import graph_decode, kv_decode
from .backends import DEFAULT_MAX_ATTENTION_CELLS, Conversation, SamplingParams, truncate_at_stop


def set_rope_theta(config, theta: float) -> None:
    """Override the RoPE base of a Hugging Face config (transformers 5 `rope_parameters`, also per
    attention type, and the older top-level `rope_theta`)."""
    found = False
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        if "rope_theta" in params:
            params["rope_theta"] = float(theta)
            found = True
        for sub in params.values():
            if isinstance(sub, dict) and "rope_theta" in sub:
                sub["rope_theta"] = float(theta)
                found = True
    if hasattr(config, "rope_theta"):
        try:
            config.rope_theta = float(theta)
            found = True
        except AttributeError:
            pass
    if not found:
        raise ValueError(f"{type(config).__name__} has no RoPE base (rope_theta) to override; drop --rope-theta")


def plan_batches(lengths: Sequence[int], batch_size: int, max_attention_cells: int = DEFAULT_MAX_ATTENTION_CELLS
                 ) -> list[list[int]]:
    """Indices of the prompts grouped shortest first: at most `batch_size` a batch, and, unless a batch
    is one prompt, batch x (longest prompt)^2 <= `max_attention_cells`. With left padding, SDPA is given
    a [batch, 1, L, L] mask (and makes a float copy of it): at 32K tokens and batch 16 that is a 32 GiB
    block (measured on an H200), at 128K and batch 8 it cannot fit anywhere."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:
        cur = batches[-1] if batches else None
        if cur and len(cur) < batch_size and (len(cur) + 1) * lengths[i] ** 2 <= max_attention_cells:
            cur.append(i)
        else:
            batches.append([i])
    return batches


def plan_decode_batches(lengths: Sequence[int], batch_size: int, token_budget: int | None,
                        max_new_tokens: int) -> list[list[int]]:
    """Indices grouped shortest first for kv_decode: at most `batch_size` a batch and, unless a batch is
    one prompt, batch x (longest prompt + max_new_tokens) <= `token_budget` (None: no budget)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:
        cur = batches[-1] if batches else None
        fits = token_budget is None or (len(cur or []) + 1) * (lengths[i] + max_new_tokens) <= token_budget
        if cur and len(cur) < batch_size and fits:
            cur.append(i)
        else:
            batches.append([i])
    return batches


class TransformersBackend:
    """In-process generation with `transformers` (batched; CPU or GPU)."""

    def __init__(
        self,
        model_path: str,
        rope_theta: float | None = None,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int = 8,
        threads: int | None = None,
        max_attention_cells: int = DEFAULT_MAX_ATTENTION_CELLS,
        decode: str = "auto",
        kv_memory_fraction: float = 0.5,
        decode_step: str = "auto",
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        if not os.path.isdir(model_path) or not os.path.isfile(os.path.join(model_path, "config.json")):
            raise FileNotFoundError(f"--model {model_path}: not a Hugging Face model directory (no config.json); a "
                                    f"Megatron checkpoint exports to one with tools/convert_checkpoint.py megatron-to-hf")
        self.torch = torch
        self.model_path = model_path
        self.rope_theta = rope_theta
        self.batch_size = max(1, batch_size)
        self.max_attention_cells = max_attention_cells
        self.threads = threads
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        config = AutoConfig.from_pretrained(model_path)
        if rope_theta is not None:
            set_rope_theta(config, rope_theta)
        torch_dtype = {
            "auto": (torch.bfloat16 if self.device.startswith("cuda") else torch.float32),
            "float32": torch.float32, "fp32": torch.float32,
            "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16,
        }.get(dtype)
        if torch_dtype is None:
            raise ValueError(f"--dtype {dtype}: choose auto, float32, bfloat16 or float16")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"{model_path}: the tokenizer has no chat template; use an instruction-tuned model")
        self.model = AutoModelForCausalLM.from_pretrained(model_path, config=config, dtype=torch_dtype)
        self.model.to(self.device).eval()
        if decode not in ("auto", "prefill", "generate"):
            raise ValueError(f"decode={decode!r}: choose auto, prefill or generate")
        why_not = kv_decode.supported(self.model)
        if decode == "prefill" and why_not:
            raise ValueError(f"decode=prefill: {why_not}; use decode=generate")
        self.decode = "generate" if decode == "generate" or why_not else "prefill"
        self.kv_memory_fraction = kv_memory_fraction
        if decode_step not in graph_decode.STEPS:
            raise ValueError(f"decode_step={decode_step!r}: choose {', '.join(graph_decode.STEPS)}")
        self.decode_step = decode_step  # the fast path's (eval/fast.py): graph_decode.choose
        self.decode_stats = kv_decode.DecodeStats()

    @property
    def name(self) -> str:
        extra = f":rope_theta={self.rope_theta:g}" if self.rope_theta else ""
        return f"transformers:{os.path.basename(os.path.normpath(self.model_path))}{extra}"

    def _prompt_ids(self, conversation: Conversation) -> list[int]:
        text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[list[str]]:
        """Generate; with `threads` set, torch's intra-op thread count is that during the call only."""
        torch = self.torch
        if self.threads is None:
            return self._chat(conversations, params)
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._chat(conversations, params)
        finally:
            torch.set_num_threads(before)

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

    def _text(self, ids: list[int], params: SamplingParams) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return truncate_at_stop(text, params.stop).strip()

    def kv_bytes_per_token(self) -> int:
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return 2 * cfg.num_hidden_layers * kv * head_dim * self.model.dtype.itemsize

    def _token_budget(self) -> int | None:
        """Key/value positions a decode batch may hold (batch x (prompt + new tokens)); None: no limit (CPU)."""
        if not self.device.startswith("cuda"):
            return None
        dev = self.torch.device(self.device)
        free, _ = self.torch.cuda.mem_get_info(dev)
        free += self.torch.cuda.memory_reserved(dev) - self.torch.cuda.memory_allocated(dev)  # torch's cache is ours
        cap = self.torch.cuda.get_per_process_memory_fraction(dev)  # < 1: a GPU shared with other jobs
        if cap < 1:  # this process's room under its allocator's cap, not the card's
            total = self.torch.cuda.get_device_properties(dev).total_memory
            free = min(free, cap * total - self.torch.cuda.memory_allocated(dev))
        return max(1, int(free * self.kv_memory_fraction) // self.kv_bytes_per_token())

    def _chat(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[list[str]]:
        if self.decode == "prefill":
            return self._chat_prefill(conversations, params)
        return self._chat_generate(conversations, params)

    def _chat_prefill(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[list[str]]:
        prompts = [self._prompt_ids(c) for c in conversations]
        rows = [i for i in range(len(prompts)) for _ in range(params.n)]  # n completions: n rows, prefix shared
        batches = plan_decode_batches([len(prompts[i]) for i in rows], self.batch_size,
                                      self._token_budget(), params.max_new_tokens)
        prefiller = kv_decode.Prefiller(self.model, self.decode_stats)
        texts: list[list[str]] = [[] for _ in prompts]
        got: dict[int, list[int]] = {}
        for b, idx in enumerate(batches):
            idx = sorted(idx, key=lambda r: prompts[rows[r]])  # a shared prefix only helps its neighbour
            seed = None if params.seed is None else params.seed + b
            new = kv_decode.decode_batch(self.model, [prompts[rows[r]] for r in idx], params.max_new_tokens,
                                         self._eos_ids(), self.tokenizer.pad_token_id, params.temperature,
                                         params.top_p, prefiller, seed)
            got.update(zip(idx, new))
        for r in range(len(rows)):
            texts[rows[r]].append(self._text(got[r], params))
        return texts

    def _chat_generate(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[list[str]]:
        from transformers import GenerationConfig

        torch = self.torch
        prompts = [self._prompt_ids(c) for c in conversations]
        sample = params.temperature > 0
        gen_kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            do_sample=sample,
            num_return_sequences=params.n,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id,
        )
        if sample:
            gen_kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        config = GenerationConfig(**gen_kwargs)
        out: list[list[str] | None] = [None] * len(prompts)
        for b, idx in enumerate(plan_batches([len(p) for p in prompts], self.batch_size, self.max_attention_cells)):
            width = max(len(prompts[i]) for i in idx)
            pad = self.tokenizer.pad_token_id
            ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx], device=self.device)
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx],
                                device=self.device)
            if params.seed is not None:
                torch.manual_seed(params.seed + b)
            with torch.no_grad():
                gen = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            new = gen[:, width:].tolist()
            for j, i in enumerate(idx):
                out[i] = [self._text(seq, params) for seq in new[j * params.n : (j + 1) * params.n]]
        return out  # type: ignore[return-value]

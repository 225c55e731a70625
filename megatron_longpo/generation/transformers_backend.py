"""`TransformersBackend`: in-process `generate()` with transformers on CPU or GPU, batched with
left padding, greedy (temperature 0) or sampled, with an optional RoPE base override."""

from __future__ import annotations

import os
from typing import Sequence

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
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        if not os.path.isdir(model_path):
            raise FileNotFoundError(f"--model {model_path}: not a Hugging Face model directory")
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

    def _chat(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[list[str]]:
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
                texts = [
                    truncate_at_stop(self.tokenizer.decode(seq, skip_special_tokens=True, clean_up_tokenization_spaces=False), params.stop).strip()
                    for seq in new[j * params.n : (j + 1) * params.n]
                ]
                out[i] = texts
        return out  # type: ignore[return-value]

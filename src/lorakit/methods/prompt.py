"""Prompt tuning (Lester, Al-Rfou, Constant, EMNLP 2021, arXiv 2104.08691), through the KV cache.

The model reads [P; E(x)]: n trainable embeddings P (n, d) before the input embeddings, at positions
0..n+T-1. Under causal attention the n virtual positions attend only to each other, so their keys
and values in every layer are exactly what the model computes on P alone. lorakit computes them once
per forward (one row, expanded to the batch; the concatenation costs batch x n token-forwards) and
hands them to the model as a cache prefix of length n (methods/kv_prefix.py). The outputs are the
real positions' outputs of the concatenated sequence: PEFT's logits[:, n:], and PEFT's loss (its
labels are shifted by n masked positions; here the virtual positions never reach the output, so
labels need no shift). Saved as PEFT's PROMPT_TUNING folder (`prompt_embeddings`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.contract import Role
from ..core.model import attach_model_adapter
from .kv_prefix import KV, KVPrefixAdapter, check_init, check_peft_decoder_only, decoder_kv, decoder_of

PEFT_INITS = {"vocab": "SAMPLE_VOCAB", "text": "TEXT", "random": "RANDOM"}


class PromptAdapter(KVPrefixAdapter):
    """Prompt tuning: n trainable input embeddings, run through the frozen decoder for their K/V."""

    method: ClassVar[str] = "prompt tuning"

    def __init__(self, config: PromptTuningConfig, model: nn.Module) -> None:
        super().__init__(config, decoder_of(model).config, config.num_virtual_tokens)
        embedding = model.get_input_embeddings().weight.detach()  # (vocab, d)
        self.prompt_embeddings = nn.Parameter(config.initial_prompt(embedding).float().clone())  # (n, d)

    def prefix_kv(self, batch: int) -> KV:
        embeds = self.prompt_embeddings[None].to(next(self.decoder.parameters()).dtype)  # (1, n, d)
        self._busy = True
        try:
            return self._expand(decoder_kv(self.decoder, inputs_embeds=embeds), batch)
        finally:
            self._busy = False

    def role_parameters(self) -> dict[Role, list[nn.Parameter]]:
        return {Role.PROMPT: [self.prompt_embeddings]}

    def export_state(self) -> dict[str, Tensor]:
        return {"prompt_embeddings": self.prompt_embeddings.detach()}

    def to_peft_dict(self) -> dict[str, Any]:
        tokenizer = self.config.tokenizer
        return {
            **self.peft_common(),
            "peft_type": "PROMPT_TUNING",
            "token_dim": self.hidden,
            "num_attention_heads": self.decoder.config.num_attention_heads,
            "prompt_tuning_init": PEFT_INITS[self.config.init_from],
            "prompt_tuning_init_text": self.config.init_text,
            "tokenizer_name_or_path": getattr(tokenizer, "name_or_path", None) or None,
            "tokenizer_kwargs": None,
        }


@dataclass
class PromptTuningConfig:
    """n virtual tokens before the input. init_from: "vocab" (embeddings of sampled vocabulary tokens,
    Lester et al.'s better-than-random choice), "text" (the embeddings of `init_text`, cycled or
    cut to n tokens; needs `tokenizer`), or "random" (PEFT's default, N(0, 1))."""

    num_virtual_tokens: int = 20
    init_from: str = "vocab"
    init_text: str | None = None
    tokenizer: Any = field(default=None, repr=False, compare=False)
    seed: int = 0

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    packing_problem: ClassVar[str | None] = (
        "its virtual tokens go before each row, so only a packed row's first sample would follow them"
    )
    default_lr: ClassVar[float] = 3e-2  # prompts need a far larger lr than LoRA (Lester: 0.3, Adafactor)

    def __post_init__(self) -> None:
        check_init(self.num_virtual_tokens, self.init_from)
        if self.init_from == "text" and (not self.init_text or self.tokenizer is None):
            raise ValueError('init_from="text" needs init_text and the tokenizer that encodes it')

    def initial_prompt(self, embedding: Tensor) -> Tensor:
        n, gen = self.num_virtual_tokens, torch.Generator().manual_seed(self.seed)
        if self.init_from == "random":
            return torch.randn(n, embedding.shape[1], generator=gen)
        if self.init_from == "text":
            ids = self.tokenizer(self.init_text, add_special_tokens=False)["input_ids"]
            ids = (ids * (n // len(ids) + 1))[:n]  # PEFT's rule: repeat the text, then cut
        else:
            ids = torch.randint(0, embedding.shape[0], (n,), generator=gen).tolist()
        return embedding[torch.tensor(ids, device=embedding.device)]

    def apply_to(self, model: nn.Module, name: str) -> None:
        attach_model_adapter(model, self, PromptAdapter(self, model), name)

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> PromptTuningConfig:
        check_peft_decoder_only(d)
        return cls(num_virtual_tokens=int(d["num_virtual_tokens"]), init_from="random")

"""DoRA: weight-decomposed low-rank adaptation (Liu et al., ICML 2024, arXiv 2402.09353).

The adapted weight is a trainable magnitude times a LoRA-updated direction:

    W' = m * (W0 + s B A) / ||W0 + s B A||_row        m: (out,), initialised to ||W0||_row

The norm is one L2 norm per output unit (a row of the (out, in) weight; the paper's "column norm"
of W^T) and is detached from the graph, as section 4.3 of the paper suggests. With
g = m / ||W0 + s B A||_row (shape (out,)) the layer never builds W' in forward:

    y = W0 x + b + (g - 1) * (W0 x) + g * s B A x  =  g * (W0 + s B A) x + b

so merging writes g[:, None] * (W0 + s B A) and keeps the bias as it is (merged == unmerged with a
bias; this is also what Hugging Face PEFT computes). In eval mode the norm (and, without autograd,
g itself) is cached until A, B, m or the base weight change, so unmerged generation costs little
more than LoRA's.

Saved as PEFT saves DoRA: `lora_A.weight`, `lora_B.weight`, `lora_magnitude_vector` and
`use_dora: true`. PiSSA init works: m is the norm of the original W0, and the saved rank-2r LoRA
(see lora.py) has the same direction on the original base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.contract import AdaptedLayer, Delta, Role
from .lora import LoRAConfig, LoRADelta


@dataclass
class DoRAConfig(LoRAConfig):
    """DoRA on linear layers (nn.Linear, GPT-2 Conv1D); the options are LoRA's."""

    def build(self, layer: AdaptedLayer, path: str) -> Delta:
        if layer.is_embedding:
            raise ValueError(
                f"DoRA on embeddings is not supported yet; {path} is an nn.Embedding. "
                "Leave it out of target_modules or use LoRAConfig for it"
            )
        rank, alpha = self.rank_alpha(path)
        return DoRADelta(layer, rank, self.scaling(rank, alpha), self.dropout, self.init)

    def to_peft_dict(self) -> dict[str, Any]:
        return {**super().to_peft_dict(), "use_dora": True}


NormKey = tuple[Any, ...]


class DoRADelta(LoRADelta):
    """The DoRA branch of one linear layer: LoRA's A and B plus a magnitude per output unit."""

    roles: ClassVar[dict[str, Role]] = {**LoRADelta.roles, "magnitude": Role.MAGNITUDE}
    peft_keys: ClassVar[dict[str, str]] = {
        **LoRADelta.peft_keys,
        "magnitude": "lora_magnitude_vector",
    }

    def __init__(self, layer: AdaptedLayer, rank: int, scale: float, dropout: float, init: str) -> None:
        w0_norm = torch.linalg.vector_norm(layer.weight_out_in(), dim=1)  # (out,), before PiSSA edits W0
        super().__init__(layer, rank, scale, dropout, init)
        self.magnitude = nn.Parameter(w0_norm)
        self.register_buffer("merge_norm", None, persistent=False)  # the norm merge divided by
        self._norm_cache: tuple[NormKey, Tensor] | None = None
        self._gain_cache: tuple[NormKey, tuple[Tensor, Tensor]] | None = None
        self._w0_cache: tuple[NormKey, Tensor] | None = None  # ||W0||^2 per row
        self._compiled_norm: Tensor | None = None  # set by prepare_compiled for one compiled call

    def forward(self, x: Tensor, base_out: Tensor, layer: AdaptedLayer) -> Tensor:
        x = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)
        lora = F.linear(F.linear(x, self.lora_A), self.lora_B)  # (..., out) = B A x, unscaled
        if self.training and not isinstance(self.dropout, nn.Identity):
            # as PEFT: with dropout the rescaled base term sees the same dropped-out input
            base = F.linear(x, layer.weight_out_in().to(x.dtype))  # (..., out) = W0 x
        else:
            bias = layer.bias
            base = base_out if bias is None else base_out - bias  # (..., out) = W0 x
        # The gains are cast to the compute dtype: fp32 gains would promote every product to fp32,
        # and autograd would keep an fp32 activation per layer (+0.8 GB on the default bench batch).
        if torch.is_grad_enabled() and self.magnitude.requires_grad:
            # g * (W0 x + s B A x) - W0 x: autograd keeps one (..., out) tensor per layer, v, for
            # m's gradient; the two-term form below would keep two (W0 x and B A x)
            g = (self.magnitude / self.weight_norm(layer)).to(lora.dtype)  # (out,)
            v = torch.add(base, lora, alpha=self.scale)  # (..., out)
            return (g * v - base).to(base_out.dtype)  # (..., out)
        g_minus_1, g_scaled = self.gains(layer, lora.dtype)  # (out,) each: g - 1 and g * s
        # (g - 1) * W0 x + g * s * B A x in two element-wise ops (decoding is per-op bound)
        return torch.addcmul(g_minus_1 * base, g_scaled, lora).to(base_out.dtype)  # (..., out)

    def gains(self, layer: AdaptedLayer, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(g - 1, g * s) with g = m / ||W0 + s B A||_row, shape (out,) each, cast to `dtype`.

        Without autograd (generation, evaluation under no_grad) both are cached in eval mode and
        reused until W0, A, B or m change; otherwise g is rebuilt so m gets its gradient."""
        cacheable = not self.training and not (torch.is_grad_enabled() and self.magnitude.requires_grad)
        key = self._cache_key(layer) if cacheable else None
        if key is not None:
            key = (*key, dtype)
        if key is not None and self._gain_cache is not None and self._gain_cache[0] == key:
            return self._gain_cache[1]
        g = self.magnitude / self.weight_norm(layer)  # (out,); the norm carries no gradient
        gains = ((g - 1).to(dtype or g.dtype), (g * self.scale).to(dtype or g.dtype))
        self._gain_cache = None if key is None else (key, gains)
        return gains

    def prepare_compiled(self, layer: AdaptedLayer) -> None:
        """Compiled decoder layers read the norm computed here, eagerly: traced, its caches (keyed on
        storage pointers and versions) broke the graph, and a default-model step took 1.49 s compiled
        against 1.53 eager; with the norm handed in, 1.35 s and 1782 MB against 2339 MB eager."""
        self._compiled_norm = self._factored_norm(layer)

    def finish_compiled(self) -> None:
        self._compiled_norm = None

    def weight_norm(self, layer: AdaptedLayer) -> Tensor:
        """||W0 + s B A||_row (out,), detached; in eval mode reused until A, B or W0 change."""
        if self._compiled_norm is not None and torch.compiler.is_compiling():
            return self._compiled_norm
        key = None if self.training else self._cache_key(layer)
        if key is not None and self._norm_cache is not None and self._norm_cache[0][:-1] == key[:-1]:
            return self._norm_cache[1]
        norm = self._factored_norm(layer)
        self._norm_cache = None if key is None else (key, norm)
        return norm

    def _factored_norm(self, layer: AdaptedLayer) -> Tensor:
        """||W0 + s B A||_row without building the (out, in) matrix: the norm is recomputed at every
        training step, and building W0 + s B A for every layer costs three weight-sized passes.

            ||W0 + s B A||^2 = ||W0||^2 + 2 s <W0, B A> + s^2 ||B A||^2      (per row)
            <W0, B A>_row = sum_k B[o, k] (W0 A^T)[o, k]
            ||B A||^2_row = sum_k B[o, k] (B (A A^T))[o, k]

        ||W0||^2 is cached until W0 changes; the rest reads W0 once in a (out, in) x (in, r) matmul.
        fp32 throughout: ||W0||^2 dominates, and the terms are close to it, so the sum keeps fp32
        precision (it agrees with the direct norm to ~1e-7 relative, tested)."""
        with torch.no_grad(), torch.autocast(self.lora_A.device.type, enabled=False):
            w = layer.weight_out_in()  # (out, in) fp32
            a, b = self.lora_A.float(), self.lora_B.float()  # (r, in), (out, r)
            cross = ((w @ a.T) * b).sum(dim=1)  # (out,)
            ba_sq = ((b @ (a @ a.T)) * b).sum(dim=1)  # (out,)
            norm_sq = self._w0_square_norm(layer, w) + 2 * self.scale * cross + self.scale**2 * ba_sq
            return norm_sq.clamp_min(0).sqrt()

    def _w0_square_norm(self, layer: AdaptedLayer, w: Tensor) -> Tensor:
        if layer.is_quantized:  # no version counter to key on
            return w.square().sum(dim=1)
        weight = layer.base_layer.weight
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if self._w0_cache is None or self._w0_cache[0] != key or weight.is_inference():
            self._w0_cache = (key, w.square().sum(dim=1))  # (out,)
        return self._w0_cache[1]

    def _norm(self, weight: Tensor) -> Tensor:
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            return torch.linalg.vector_norm(weight + self.delta_weight(), dim=1)  # (out,) fp32

    def _cache_key(self, layer: AdaptedLayer) -> NormKey | None:
        """Storage and in-place version of each input: optimizer steps, copy_, merge and .to()
        all change it. (Writes through `.data` bypass version counters; call .train() after them.)
        The last entry is m's, which the gains depend on and the norm does not."""
        tensors = (layer.base_layer.weight, self.lora_A, self.lora_B, self.magnitude)
        if any(t.is_inference() for t in tensors):
            return None
        state = tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)
        return (torch.is_inference_mode_enabled(), *state)

    def train(self, mode: bool = True) -> DoRADelta:
        self._norm_cache = self._gain_cache = None
        return super().train(mode)

    def merged_weight(self, weight: Tensor) -> Tensor:
        self.merge_norm = self._norm(weight)  # kept so that unmerge divides by the very same g
        g = self.magnitude.detach().float() / self.merge_norm  # (out,)
        return g[:, None] * (weight + self.delta_weight())  # (out, in)

    def unmerged_weight(self, weight: Tensor) -> Tensor:
        if self.merge_norm is None:
            raise RuntimeError("this DoRA delta has no stored merge norm; it was never merged")
        g = self.magnitude.detach().float() / self.merge_norm  # (out,)
        return weight / g[:, None] - self.delta_weight()  # (out, in) = W0

    def export_state(self) -> dict[str, Tensor]:
        return {**super().export_state(), "lora_magnitude_vector": self.magnitude.detach()}

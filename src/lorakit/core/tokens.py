"""Trainable token rows: chosen rows of the input embedding (and of an untied output head) train,
every other row stays the base's. The form of Hugging Face PEFT's `trainable_token_indices`.

A vocabulary extension (lorakit.vocab) grows the embedding and head first (`grow_embeddings`), then
adds a `TokenRowsDelta` to each under an adapter's name (`add_token_rows`): the delta holds the
rows' current values, replaces them in the layer's output, and saves as PEFT's
`<embedding path>.token_adapter.trainable_tokens_delta` (the rows themselves, not a difference,
despite PEFT's name). With tied embeddings the head's delta shares the embedding's rows, as PEFT's
tied token adapter does, and only the embedding's are saved.

The rows start equal to the base's, so a model with token rows added computes what it did before;
a token outside the rows takes the base layer's output untouched (bit for bit).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .contract import AdaptedLayer, Delta, Role

PEFT_SUFFIX = "token_adapter.trainable_tokens_delta"


class TokenRowsDelta(Delta):
    """Rows `token_ids` of an embedding (the tokens' input vectors) or of an output head (their
    logit weights), trained in place of the base's rows."""

    roles: ClassVar[dict[str, Role]] = {"rows": Role.TOKENS}
    peft_keys: ClassVar[dict[str, str]] = {"rows": PEFT_SUFFIX}
    is_target: ClassVar[bool] = False  # not a PEFT target module: `trainable_token_indices` instead

    def __init__(
        self, layer: AdaptedLayer, token_ids: list[int], tied_to: TokenRowsDelta | None = None
    ) -> None:
        super().__init__()
        weight = layer.base_layer.weight
        size = weight.shape[0]  # embedding (V, d) and Linear head (V, d): rows are tokens either way
        bad = [t for t in token_ids if not 0 <= t < size]
        if bad or len(set(token_ids)) != len(token_ids) or not token_ids:
            raise ValueError(
                f"trainable token ids must be distinct ids below the vocabulary size {size}; "
                f"got {len(token_ids)} ids{f', e.g. {bad[0]} out of range' if bad else ''}"
            )
        self.token_ids = list(token_ids)
        self.is_embedding = layer.is_embedding
        index = torch.tensor(token_ids, dtype=torch.long, device=weight.device)
        slot = torch.full((size,), -1, dtype=torch.long, device=weight.device)
        slot[index] = torch.arange(len(token_ids), device=weight.device)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("slot", slot, persistent=False)  # token id -> its row here, or -1
        self.register_buffer("original", weight.detach()[index].float().clone(), persistent=False)
        self.__dict__["tied_to"] = tied_to  # outside the module tree: its rows are saved once
        if tied_to is None:
            self.rows = nn.Parameter(self.original.clone())
        else:
            if tied_to.token_ids != self.token_ids:
                raise ValueError("a tied head's trainable rows must be the embedding's")
            self.__dict__["peft_keys"] = {}  # saved with the embedding's delta
            self.__dict__["roles"] = {}  # and trained as its parameter

    @property
    def values(self) -> Tensor:
        tied = self.__dict__["tied_to"]
        return self.rows if tied is None else tied.rows

    def forward(self, x: Tensor, base_out: Tensor, layer: AdaptedLayer) -> Tensor:
        return self.add_to(base_out, x, base_out, layer) - base_out

    def add_to(self, out: Tensor, x: Tensor, base_out: Tensor, layer: AdaptedLayer) -> Tensor:
        rows = self.values
        if self.is_embedding:  # x: token ids; replace the vectors of the tokens that have a row here
            slot = self.slot[x]
            hit = slot >= 0
            picked = rows[slot.clamp(min=0)]
            scale = getattr(layer.base_layer, "embed_scale", None)  # Gemma-style scaled embeddings
            if scale is not None:
                picked = picked * scale.to(picked.dtype)
            return torch.where(hit.unsqueeze(-1), picked.to(out.dtype), out)
        logits = F.linear(x, rows.to(x.dtype))  # x: hidden states; these tokens' logits
        return out.index_copy(out.dim() - 1, self.index, logits.to(out.dtype))

    def replaces_rows(self) -> tuple[Tensor, Tensor]:
        """(token ids, their rows) of a head: the fused training loss (lorakit.train.loss) puts
        them into the head's weight and forms their gradient alone."""
        return self.index, self.values

    def merged_weight(self, weight: Tensor) -> Tensor:
        return self._write(weight, self.values.detach())

    def unmerged_weight(self, weight: Tensor) -> Tensor:
        return self._write(weight, self.original)

    def _write(self, weight: Tensor, rows: Tensor) -> Tensor:
        """`weight` in (out, in) layout: an embedding's is (d, V), its tokens are columns."""
        rows = rows.to(weight)
        if self.is_embedding:
            return weight.index_copy(1, self.index, rows.T)
        return weight.index_copy(0, self.index, rows)

    def peft_config_entry(self, path: str) -> dict[str, Any]:
        return {path.rsplit(".", 1)[-1]: self.token_ids}


def output_layer_path(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def input_layer_path(model: nn.Module) -> str:
    embed = model.get_input_embeddings()
    return next(n for n, m in model.named_modules() if m is embed)


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdaptedLayer) else module


def heads_tied(model: nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and _base(head).weight is _base(model.get_input_embeddings()).weight


def refuse_adapted_embeddings(model: nn.Module) -> None:
    layers = (model.get_input_embeddings(), model.get_output_embeddings())
    if any(isinstance(m, AdaptedLayer) for m in layers):
        raise ValueError(
            "grow the vocabulary before adding adapters: the embedding or head already holds one"
        )


def grow_embeddings(model: nn.Module, start: int, embed_rows: Tensor, head_rows: Tensor | None) -> list[int]:
    """Put rows for new tokens `start ... start + n - 1` into the input embedding and an untied output
    head, growing both when they are too small (a model whose embedding is padded past its
    tokenizer's size has unused rows there already); returns the new token ids. `head_rows` is
    ignored when the head is tied to the embedding (it has the same rows)."""
    refuse_adapted_embeddings(model)
    size = model.get_input_embeddings().weight.shape[0]
    n = embed_rows.shape[0]
    if start > size:
        raise ValueError(f"new tokens would start at id {start}, past the {size} embedding rows")
    tied = heads_tied(model)
    if start + n > size:
        model.resize_token_embeddings(start + n, mean_resizing=False)
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed[start : start + n] = embed_rows.to(embed.dtype)
        head = model.get_output_embeddings()
        if head is not None and not tied:
            if head_rows is None:
                raise ValueError("this model's head is not tied to its embedding: give its new rows too")
            head.weight[start : start + n] = head_rows.to(head.weight.dtype)
    if tied and not heads_tied(model):
        raise RuntimeError(
            "growing the vocabulary untied the head from the embedding; this model is not supported"
        )
    return list(range(start, start + n))


def token_layers(model: nn.Module, token_ids: list[int]) -> dict[str, list[int]]:
    """Where a vocabulary extension's rows train: the embedding, and an untied head too (a tied head
    follows the embedding)."""
    layers = {input_layer_path(model): list(token_ids)}
    head = output_layer_path(model)
    if head is not None and not heads_tied(model):
        layers[head] = list(token_ids)
    return layers


def add_token_rows(model: nn.Module, adapter_name: str, layers: dict[str, list[int]]) -> list[TokenRowsDelta]:
    """Train the given rows ({layer path: token ids}, see `token_layers`) as part of adapter
    `adapter_name`, an adapter already on the model: saved, loaded, merged and switched with it.
    With tied embeddings the head's rows are the embedding's (one tensor, saved once)."""
    from .model import registry

    if adapter_name not in registry(model).configs:
        raise KeyError(f"no adapter named {adapter_name!r} to add trainable token rows to")
    embed, head = input_layer_path(model), output_layer_path(model)
    layers = dict(layers)
    tied = heads_tied(model) and head is not None
    if tied and embed in layers:
        if layers.setdefault(head, layers[embed]) != layers[embed]:
            raise ValueError(
                "the head is tied to the embedding: its trainable token rows must be the embedding's"
            )
    deltas: list[TokenRowsDelta] = []
    owner = None
    for path in sorted(layers, key=lambda p: p != embed):  # the embedding first: a tied head follows it
        module = model.get_submodule(path)
        if isinstance(module, AdaptedLayer) and adapter_name in module.adapters:
            raise ValueError(
                f"adapter {adapter_name!r} already adapts {path}; trainable token rows replace rows of "
                "that layer and cannot be combined with another change to it under the same adapter"
            )
        layer = module if isinstance(module, AdaptedLayer) else AdaptedLayer(module)
        if layer is not module:
            model.set_submodule(path, layer)
        delta = TokenRowsDelta(layer, layers[path], tied_to=owner if tied and path == head else None)
        owner = delta if owner is None else owner
        layer.adapters[adapter_name] = delta
        layer.train(module.training)
        layer.active = [n for n in registry(model).active if n in layer.adapters]
        delta.requires_grad_(adapter_name in registry(model).active)
        deltas.append(delta)
    return deltas


def token_rows(model: nn.Module, adapter_name: str) -> list[tuple[str, TokenRowsDelta]]:
    from .model import adapter_deltas

    return [(p, d) for p, _, d in adapter_deltas(model, adapter_name) if isinstance(d, TokenRowsDelta)]


def peft_token_indices(model: nn.Module, adapter_name: str) -> Any:
    """PEFT's `trainable_token_indices` for the adapter's rows: a list (the embedding only; PEFT ties a
    tied head to it) or a dict by layer name when the head has its own rows."""
    entries: dict[str, list[int]] = {}
    for path, delta in token_rows(model, adapter_name):
        if delta.__dict__["tied_to"] is None:
            entries.update(delta.peft_config_entry(path))
    if not entries:
        return None
    return next(iter(entries.values())) if len(entries) == 1 else entries


def layers_for_indices(model: nn.Module, spec: Any) -> dict[str, list[int]]:
    """PEFT's `trainable_token_indices` (a list, or a dict by layer name) -> {layer path: ids}."""
    embed, head = input_layer_path(model), output_layer_path(model)
    if isinstance(spec, list):
        return {embed: [int(i) for i in spec]}
    if not isinstance(spec, dict):
        raise ValueError(f"trainable_token_indices must be a list or a dict, got {type(spec).__name__}")
    out = {}
    for name, ids in spec.items():
        match = [p for p in (embed, head) if p is not None and (p == name or p.endswith("." + name))]
        if not match:
            raise ValueError(
                f"trainable_token_indices names {name!r}; lorakit trains token rows of the input "
                f"embedding ({embed}) and output head ({head}) only"
            )
        out[match[0]] = [int(i) for i in ids]
    return out

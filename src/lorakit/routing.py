"""A per-input router over already-trained task adapters (issue 20's second part, the source
documents' "activate, for each input, the module that suits it").

The router reads the prompt only: the base model's hidden state at one layer, averaged over the
prompt's tokens (adapters off), standardised, then a linear softmax over the task adapters. It
decides once per sequence, before the first token is generated, so generation keeps one choice
and one KV cache (X-LoRA re-routes every token with a second full pass and no cache). Two modes:

    pick     the most probable adapter alone (default)
    weights  every adapter at once, each one's output scaled by its probability
             (lorakit.weighted_adapters: a weighted sum of their changes)

It trains in seconds on a little of each task's data: `train_router` computes the features once and
fits the softmax by full-batch gradient descent with an L2 penalty. A router folder holds
`router.json` (the adapters' names and folders, the layer, the mode, the model's hidden size) and
`router.safetensors` (weight, bias, the features' mean and std).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .core.io import atomic_folder
from .core.model import disable_adapters, registry, weighted
from .train.evaluate import chat_prompt_ids

CONFIG_FILE, WEIGHTS_FILE = "router.json", "router.safetensors"
MODES = ("pick", "weights")
Prompt = (
    str | Sequence[dict[str, Any]]
)  # a user message, or a conversation (its last assistant turn is dropped)


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """The tokens generation would start from: the chat template up to the assistant's header."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]  # a training conversation: route on what comes before the answer
    return chat_prompt_ids(tokenizer, messages)


@torch.no_grad()
def prompt_features(
    model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], layer: int, batch_size: int = 8
) -> Tensor:
    """(len(prompts), hidden): hidden state `layer` (0 = the embeddings) of the base model, adapters
    off, averaged over each prompt's tokens."""
    device = next(model.parameters()).device
    rows = [prompt_ids(tokenizer, p) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    with disable_adapters(model):
        for at in range(0, len(rows), batch_size):
            chunk = rows[at : at + batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in chunk], device=device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk], device=device)
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
            weight = mask[..., None].to(hidden.dtype)
            out.append(((hidden * weight).sum(1) / weight.sum(1)).float().cpu())
    return torch.cat(out)


@dataclass
class TaskRouter:
    """A trained router; `adapters` maps each adapter name (the order of the softmax) to its folder."""

    adapters: dict[str, str]
    layer: int
    weight: Tensor  # (N, hidden)
    bias: Tensor  # (N,)
    mean: Tensor  # (hidden,)
    std: Tensor  # (hidden,)
    mode: str = "pick"

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def logits(self, features: Tensor) -> Tensor:
        return ((features - self.mean) / self.std) @ self.weight.T + self.bias

    def probabilities(self, model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt]) -> Tensor:
        """(len(prompts), N): the softmax over the adapters, per prompt."""
        self._check_model(model)
        return torch.softmax(self.logits(prompt_features(model, tokenizer, prompts, self.layer)), -1)

    def choose(self, model: nn.Module, tokenizer: Any, prompt: Prompt) -> dict[str, float]:
        """The adapters to run for this prompt and each one's weight: {name: 1.0} in pick mode."""
        probs = self.probabilities(model, tokenizer, [prompt])[0]
        if self.mode == "pick":
            return {self.names[int(probs.argmax())]: 1.0}
        return {name: float(p) for name, p in zip(self.names, probs, strict=True)}

    @contextmanager
    def routed(self, model: nn.Module, tokenizer: Any, prompt: Prompt) -> Iterator[dict[str, float]]:
        """Run the block with this prompt's choice active (the adapters must be loaded under their
        names, `load_task_adapters`); yields the choice."""
        choice = self.choose(model, tokenizer, prompt)
        missing = [n for n in self.names if n not in registry(model).configs]
        if missing:
            raise KeyError(f"the router's adapters {missing} are not loaded; call load_task_adapters first")
        with weighted(model, choice):
            yield choice

    def chat_route(self, model: nn.Module, tokenizer: Any) -> Callable[[Any], AbstractContextManager[str]]:
        """`generate.chat_repl`'s `route`: each reply runs with the history's choice, labelled."""

        @contextmanager
        def route(history: Any) -> Iterator[str]:
            with self.routed(model, tokenizer, history) as choice:
                yield ", ".join(f"{n} {w:.2f}" for n, w in choice.items())

        return route

    def _check_model(self, model: nn.Module) -> None:
        hidden = int(model.config.hidden_size)
        if hidden != self.weight.shape[1]:
            raise ValueError(
                f"this router reads hidden states of size {self.weight.shape[1]}; the model's are {hidden}: "
                "it was trained on another base model"
            )

    def save(self, folder: str | os.PathLike) -> Path:
        config = {
            "adapters": self.adapters,
            "layer": self.layer,
            "mode": self.mode,
            "hidden_size": self.weight.shape[1],
        }
        tensors = {"weight": self.weight, "bias": self.bias, "mean": self.mean, "std": self.std}

        def write(tmp: Path) -> None:
            tmp.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

        atomic_folder(Path(folder), write)
        return Path(folder)

    @classmethod
    def load(cls, folder: str | os.PathLike, mode: str | None = None) -> TaskRouter:
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(
                f"{folder} is not a router folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}"
            )
        try:
            config = json.loads((folder / CONFIG_FILE).read_text())
            t = load_file(str(folder / WEIGHTS_FILE))
            router = cls(
                config["adapters"], int(config["layer"]), t["weight"], t["bias"], t["mean"], t["std"]
            )
        except (KeyError, ValueError, OSError) as err:
            raise ValueError(
                f"{folder} holds a damaged router ({type(err).__name__}: {err}); train it again"
            ) from None
        router.mode = mode or config.get("mode", "pick")
        if router.mode not in MODES:
            raise ValueError(f"router mode must be one of {', '.join(MODES)}, got {router.mode!r}")
        return router


def routed_exact_match(
    model: nn.Module,
    tokenizer: Any,
    router: TaskRouter,
    items: Sequence[Any],
    score_fn: Callable[[str, str], bool],
    max_new_tokens: int = 24,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Exact match with each held-out item answered under its own routing choice (made from its
    prompt, as in chat): in pick mode the items are grouped by the adapter picked and each group is
    generated in batches; in weights mode each item runs alone with its weights. Also returns how
    many items went to each adapter and the accuracy of each group."""
    from .train.evaluate import exact_match

    items = list(items)
    if not items:
        raise ValueError("routed evaluation got no held-out items")
    probs = router.probabilities(model, tokenizer, [it.messages for it in items])
    generate = {"max_new_tokens": max_new_tokens, "autocast_dtype": autocast_dtype}
    if router.mode == "pick":
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(probs):
            groups.setdefault(router.names[int(row.argmax())], []).append(i)
        runs = [({name: 1.0}, rows) for name, rows in groups.items()]
    else:
        runs = [
            ({n: float(p) for n, p in zip(router.names, row, strict=True)}, [i])
            for i, row in enumerate(probs)
        ]
    correct, examples = 0, []
    by_adapter: dict[str, dict[str, int]] = {n: {"n": 0, "correct": 0} for n in router.names}
    for choice, rows in runs:
        with weighted(model, choice):
            result = exact_match(model, tokenizer, [items[i] for i in rows], score_fn, **generate)
        correct += result["correct"]
        examples += result["examples"][: max(0, 5 - len(examples))]
        top = max(choice, key=choice.__getitem__)
        by_adapter[top]["n"] += len(rows)
        by_adapter[top]["correct"] += result["correct"]
    return {
        "accuracy": correct / len(items),
        "n": len(items),
        "correct": correct,
        "routing": {n: v["n"] for n, v in by_adapter.items()},
        "by_adapter": {n: v["correct"] / v["n"] for n, v in by_adapter.items() if v["n"]},
        "mode": router.mode,
        "examples": examples,
    }


def load_task_adapters(model: nn.Module, router: TaskRouter, folders: Sequence[str] | None = None) -> None:
    """Load the router's adapters under their names (from `folders`, in the router's order, if
    given: the adapters moved), frozen."""
    from .api import load_adapter

    if folders is not None:
        if len(folders) != len(router.names):
            raise ValueError(
                f"{len(folders)} adapter folders for a router over {len(router.names)} adapters "
                f"({', '.join(router.names)}); give them in that order"
            )
        router.adapters = dict(zip(router.names, map(str, folders), strict=True))
    for name, folder in router.adapters.items():
        load_adapter(model, folder, adapter_name=name, trainable=False)


def train_router(
    model: nn.Module,
    tokenizer: Any,
    tasks: dict[str, Sequence[Prompt]],
    adapters: dict[str, str],
    layer: int | None = None,
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-3,
    mode: str = "pick",
) -> TaskRouter:
    """Fit a router on prompts of each task (`tasks[name]`, name as in `adapters`). Deterministic."""
    if set(tasks) != set(adapters):
        raise ValueError(f"tasks {sorted(tasks)} and adapters {sorted(adapters)} must name the same tasks")
    if len(adapters) < 2:
        raise ValueError("a router needs at least two task adapters to choose between")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    empty = [n for n, p in tasks.items() if not p]
    if empty:
        raise ValueError(f"no prompts for task(s) {empty}")
    layers = int(model.config.num_hidden_layers)
    layer = layers // 2 if layer is None else layer
    if not 0 <= layer <= layers:
        raise ValueError(f"layer must be in 0..{layers} (0 = the embeddings), got {layer}")
    names = list(adapters)
    features = torch.cat([prompt_features(model, tokenizer, tasks[n], layer) for n in names])
    labels = torch.cat([torch.full((len(tasks[n]),), i) for i, n in enumerate(names)])
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6)
    x = (features - mean) / std
    weight = torch.zeros(len(names), x.shape[1], requires_grad=True)
    bias = torch.zeros(len(names), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = (
                nn.functional.cross_entropy(x @ weight.T + bias, labels)
                + weight_decay * weight.square().sum()
            )
            loss.backward()
            optimizer.step()
    return TaskRouter(dict(adapters), layer, weight.detach(), bias.detach(), mean, std, mode)

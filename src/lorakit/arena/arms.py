"""The arena's contestants: a name, the `lorakit train` options that make it, and a line on what it is.

Each arm trains with its method's own documented defaults (learning rate included: a config's
`default_lr`); the arena adds only what every arm shares (task, data, steps, batch, seed, scoring).
An arm that cannot run on the shared task says why (`excluded`), and `all` leaves it out while the
report names it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arm:
    name: str
    args: tuple[str, ...]
    what: str
    excluded: str | None = None  # why `all` leaves it out (and an explicit request is refused)
    knob: str | None = None  # the RunConfig field its trainable count grows with (--match-params)
    fixed_size: str | None = None  # why it has none


ARMS: dict[str, Arm] = {
    arm.name: arm
    for arm in (
        Arm("lora", ("--method", "lora"), "LoRA, r=16 on every linear layer", knob="rank"),
        Arm("rslora", ("--method", "lora", "--use-rslora"), "LoRA scaled by alpha/sqrt(r) (rsLoRA)", knob="rank"),
        Arm("pissa", ("--method", "lora", "--init", "pissa"), "LoRA from the top singular vectors (PiSSA)", knob="rank"),
        Arm("dora", ("--method", "dora"), "weight-decomposed LoRA (magnitude and direction)", knob="rank"),
        Arm("loraplus", ("--method", "loraplus"), "LoRA with a larger learning rate for B (LoRA+)", knob="rank"),
        Arm("qlora", ("--method", "qlora"), "LoRA on an NF4 4-bit base (QLoRA)", knob="rank"),
        Arm("adalora", ("--method", "adalora"), "LoRA with a rank budget moved by importance (AdaLoRA)",
            fixed_size="its ranks move while it trains"),
        Arm("alora", ("--method", "alora"), "LoRA switched on at the answer (activated LoRA)", knob="rank"),
        Arm("quantum", ("--method", "quantum"), "Quantum-PEFT: Pauli-parameterised unitary factors",
            fixed_size="its count is not linear in one knob"),
        Arm("mopeft", ("--method", "mopeft"), "a gated mixture of LoRA and adapter experts (MoPEFT)",
            fixed_size="its experts have separate sizes"),
        Arm("adapter", ("--method", "adapter"), "bottleneck adapters after attention and MLP", knob="adapter_size"),
        Arm("prompt", ("--method", "prompt"), "prompt tuning: trained virtual tokens", knob="virtual_tokens"),
        Arm("prefix", ("--method", "prefix"), "prefix tuning: trained keys and values per layer", knob="virtual_tokens"),
        Arm("bitfit", ("--method", "bitfit"), "BitFit: biases only", fixed_size="the model's biases"),
        Arm("norm", ("--method", "norm"), "the normalisation weights only", fixed_size="the model's norms"),
        Arm("full", ("--method", "full"), "full fine-tuning: every weight", fixed_size="every weight"),
        Arm("longlora", ("--method", "longlora"), "LongLoRA: context extension",
            excluded="a context-extension method trained on long documents (--task wiki), not on a short "
            "question-answer task; measured in docs/methods/longlora.md"),
    )
}  # fmt: skip


def resolve_arms(spec: str) -> list[Arm]:
    """`all`, or comma-separated arm names, in ARMS order for `all` and as given otherwise."""
    if spec.strip() == "all":
        return [arm for arm in ARMS.values() if arm.excluded is None]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError("--methods is empty; name arms (e.g. lora,dora) or say all")
    unknown = [n for n in names if n not in ARMS]
    if unknown:
        raise ValueError(f"--methods: unknown arm(s) {', '.join(unknown)}; known: {', '.join(ARMS)}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--methods names {', '.join(twice)} more than once")
    for name in names:
        if ARMS[name].excluded:
            raise ValueError(f"--methods {name}: not an arena arm: {ARMS[name].excluded}")
    return [ARMS[n] for n in names]

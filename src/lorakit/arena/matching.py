"""`--match-params N`: each arm's size set so that it trains about N parameters.

An arm's trainable count grows linearly with its size knob (LoRA-family rank, the adapter's
bottleneck width, the virtual tokens of prompt and prefix tuning), so two trial applications on a
copy of the base (knob 1 and 2) give the line, and the knob is the nearest integer on it (at least
1). With the rank, alpha follows as 2 x rank, the default ratio, so the scale alpha/r stays that of
the default run. Arms without such a knob (AdaLoRA, whose ranks move while it trains; Quantum-PEFT
and MoPEFT, whose counts are not one line in one knob; BitFit, norm and full fine-tuning, whose
counts are fixed) run at their own size, and the report says so.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from .arms import Arm

KNOBS = {"rank": "--rank", "adapter_size": "--adapter-size", "virtual_tokens": "--virtual-tokens"}


def run_config_of(arm: Arm, **values: Any) -> Any:
    """The RunConfig of `lorakit train <arm.args>`, with `values` on top (arm args are --name value
    pairs and --flags)."""
    from lorakit.options import RunConfig

    settings: dict[str, Any] = {}
    args = list(arm.args)
    while args:
        name = args.pop(0).removeprefix("--").replace("-", "_")
        settings[name] = args.pop(0) if args and not args[0].startswith("--") else True
    return dataclasses.replace(RunConfig(), **settings, **values)


def count(model: Any, tokenizer: Any, arm: Arm, **values: Any) -> int:
    from lorakit import api
    from lorakit.options import method_config

    trial = copy.deepcopy(model)
    api.apply(trial, method_config(run_config_of(arm, **values), tokenizer, 0))
    return sum(p.numel() for p in trial.parameters() if p.requires_grad)


def matched_args(arms: list[Arm], target: int, model_path: str | None) -> dict[str, dict[str, Any]]:
    """{arm: {"args": extra train args, "knob": ..., "value": ..., "expected": count}} for the arms
    with a knob; {arm: {"args": [], "note": why not}} for the others."""
    from lorakit.run import api_load

    model, tokenizer = api_load(model_path)
    out: dict[str, dict[str, Any]] = {}
    for arm in arms:
        if arm.knob is None:
            out[arm.name] = {"args": [], "note": arm.fixed_size or "no size knob"}
            continue
        extra = (lambda k: {"alpha": 2.0 * k}) if arm.knob == "rank" else (lambda k: {})
        one, two = (count(model, tokenizer, arm, **{arm.knob: k}, **extra(k)) for k in (1, 2))
        slope, offset = two - one, 2 * one - two
        value = max(1, round((target - offset) / slope))
        args = [KNOBS[arm.knob], str(value)] + (["--alpha", str(2.0 * value)] if arm.knob == "rank" else [])
        out[arm.name] = {"args": args, "knob": arm.knob, "value": value, "expected": offset + slope * value}
    return out

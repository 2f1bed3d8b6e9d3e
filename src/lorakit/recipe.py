"""The default run's recipe for the machine it runs on (`lorakit train --recipe`).

`lorakit train` with no options trains LoRA for 150 steps at lr 1e-3. On a CPU with native bf16
(AVX512-BF16 or AMX) that is ~6 of the run's ~8 minutes; on a CPU without it the trainer runs in
fp32 (bf16 would be emulated, slower still) and the same run took 11 min 40 s on an AVX512 EPYC
limited to AVX2 (docs/benchmarks.md), ~20 minutes expected on a slower AVX2-only EPYC. There the
default run is the *light* recipe instead: fewer steps at a higher learning rate, chosen by
measurement on the default task (docs/benchmarks.md), and the run's first line says which recipe it
took and why.

Only the options the recipe sets decide: given any of them (--steps 300, say), the run is the
standard one with what was given, since the light recipe's values were measured together.
"""

from __future__ import annotations

from typing import Any

from .long.run import DOCUMENT_TASKS

RECIPES = ("auto", "standard", "light")
# measured together on the default task (docs/benchmarks.md): 100 steps of 16 samples at lr 2e-3
LIGHT = {"steps": 100, "lr": 2e-3}
# methods whose light recipe was measured (LoRA's variants have their own learning rates)
LIGHT_METHODS = ("lora",)


def choose_recipe(values: dict[str, Any], fp32: bool) -> tuple[dict[str, Any], str | None]:
    """The run's options with the recipe applied, and the line saying what it chose (None: the
    method has no light recipe, nothing to say). `values` are the options the user gave (YAML and
    flags); `fp32`: whether training would run in fp32 (`train.optim.precision_choice`)."""
    recipe = values.get("recipe", "auto")
    if recipe not in RECIPES:
        raise ValueError(f"--recipe {recipe!r}: expected one of {', '.join(RECIPES)}")
    method = values.get("method", "lora")
    if values.get("task") in DOCUMENT_TASKS and not values.get("data"):
        method = "documents"  # long-document runs train differently (lorakit.long); no light recipe
    light = ", ".join(f"{k} {v:g}" for k, v in LIGHT.items())
    given = [k for k in LIGHT if k in values]
    flags = ", ".join("--" + k.replace("_", "-") for k in given)
    if recipe == "light":
        if method not in LIGHT_METHODS:
            raise ValueError(
                f"--recipe light is measured for --method {', '.join(LIGHT_METHODS)} only, not {method}; "
                "drop --recipe or set --steps and --lr yourself"
            )
        if given:
            raise ValueError(f"--recipe light sets {light}; drop {flags} or use --recipe standard")
        return {**values, **LIGHT}, f"recipe: light ({light}; asked for)"
    if method not in LIGHT_METHODS:
        return values, None
    if recipe == "standard":
        return values, "recipe: standard (asked for)"
    if not fp32:
        return values, "recipe: standard (training runs in bf16 here; --recipe light for a shorter run)"
    if given:
        return values, f"recipe: standard ({flags} given: the light recipe's {light} go together)"
    return {**values, **LIGHT}, (
        f"recipe: light ({light} instead of 150 steps at 1e-3): training runs in fp32 on this CPU (no "
        "native bf16), where a step takes 1.5-3x as long as with native bf16; the light run keeps the "
        "default task above 80% exact match (docs/benchmarks.md); --recipe standard for the full run"
    )

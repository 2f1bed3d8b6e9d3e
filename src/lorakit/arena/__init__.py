"""The arena: every method on the same task, data, steps, batch and seeds; one table, one report.

    lorakit arena [--methods lora,dora,...|all] [--seeds 3] [--steps N] [--quick] [--out arena]

Each method x seed is an ordinary `lorakit train` run in its own folder (`OUT/runs/<arm>-s<seed>`,
a child process, so a crash or an out-of-memory kill costs that run only), followed by a decoding
latency measurement of its adapter, unmerged and merged (`arena.latency`, another child). A run
that finished carries `status.json` (`done` with its costs, or `failed` with the error's last
lines); an arena started again skips those and resumes an interrupted run from its checkpoints.
`OUT/results.json` gathers every run's figures, the means and spreads over seeds, and the machine
(CPU model, bf16 support, threads), the commit and the date; `OUT/report.md`, `OUT/report.html`
(static, sortable, images inline) and the PNG plots are drawn from it (arena.report).
"""

from .arms import ARMS, Arm, resolve_arms
from .runner import ArenaConfig, run_arena

__all__ = ["ARMS", "Arm", "ArenaConfig", "resolve_arms", "run_arena"]

"""The `lorakit` command's entry point: set glibc's allocator up for training, then run `lorakit.cli`.

It lives outside the `lorakit` package because importing the package imports torch (4 s), and what
it sets only takes effect in a process that starts with it: on Linux with glibc, it starts the
command again (`exec` of its own script, before anything heavy is imported) with `GLIBC_TUNABLES`
asking for no per-thread cache of small freed blocks (tcache) and no fast bins. Those caches keep small blocks
(tensor headers, autograd nodes) "in use" wherever they were freed, scattered through the space the
previous step's activations left, so the next step cannot reuse that space in one piece and the
heap grows instead. Measured on the default task's fp32 batches (docs/benchmarks.md, "glibc's small-
block caches"): a step's peak resident memory 0.82-0.88x of what it is with the caches, at the same
step time.

A `GLIBC_TUNABLES` that already sets either knob is left as it is; `LORAKIT_MALLOC=default` skips
all this. `torchrun -m lorakit` / `python -m lorakit` do not pass through here: set
`GLIBC_TUNABLES` in their environment (`lorakit_launcher.tunables()` says what to).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

KNOBS = ("glibc.malloc.tcache_count=0", "glibc.malloc.mxfast=0")
MARKER = "LORAKIT_GLIBC_TUNABLES"  # what the launcher added to GLIBC_TUNABLES (the bench takes it out again)
OPT_OUT = "LORAKIT_MALLOC"  # "default": leave glibc as it is


def glibc() -> bool:
    """Whether this is Linux with glibc (musl and the other systems have no such tunables)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


def tunables(current: str = "") -> str:
    """`current` GLIBC_TUNABLES with lorakit's knobs appended (a knob the user set is kept)."""
    parts = [p for p in current.split(":") if p]
    named = {p.split("=", 1)[0] for p in parts}
    parts += [k for k in KNOBS if k.split("=", 1)[0] not in named]
    return ":".join(parts)


def environment(env: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to start again with, or None where nothing would change (already set, opted
    out, not glibc)."""
    if env.get(OPT_OUT, "") == "default" or MARKER in env or not glibc():
        return None
    current = env.get("GLIBC_TUNABLES", "")
    wanted = tunables(current)
    if wanted == current:
        return None
    return {**env, "GLIBC_TUNABLES": wanted, MARKER: wanted[len(current) :].lstrip(":")}


def without(env: Mapping[str, str]) -> dict[str, str]:
    """`env` as it was before the launcher added its knobs (for processes that should not get them)."""
    added = env.get(MARKER)
    out = {k: v for k, v in env.items() if k != MARKER}
    if added:
        current = env.get("GLIBC_TUNABLES", "")
        kept = [p for p in current.split(":") if p and p not in added.split(":")]
        if kept:
            out["GLIBC_TUNABLES"] = ":".join(kept)
        else:
            out.pop("GLIBC_TUNABLES", None)
    return out


def child_environment(env: Mapping[str, str], as_command: bool) -> dict[str, str]:
    """A child process's environment: what the `lorakit` command would start with (`as_command`),
    or what a Python program would (`env` without the launcher's knobs), whichever way `env` came."""
    plain = without(env)
    return (environment(plain) or plain) if as_command else plain


def command_line(argv: list[str]) -> list[str]:
    """How to start this command again: its script where there is one (`python -m` would put the
    working directory first on the import path, where a `lorakit` folder or module could shadow the
    package), else `python -m lorakit`."""
    if argv and os.path.isfile(argv[0]):
        return [sys.executable, argv[0], *argv[1:]]
    return [sys.executable, "-m", "lorakit", *argv[1:]]


def main() -> None:
    env = environment(os.environ)
    if env is not None:
        try:
            os.execve(sys.executable, command_line(sys.argv), env)
        except OSError:  # no way to start again (an unusual interpreter): run as we are
            pass
    from lorakit.cli import main as run

    run()


if __name__ == "__main__":
    main()

"""The `lorakit` command's entry point (`lorakit_launcher`): which environment it starts the command
again with, and that it does so before the package (and torch) is imported. Its memory effect is a
bench figure (docs/benchmarks.md), not a test."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lorakit_launcher as launcher

KNOBS = ":".join(launcher.KNOBS)
GLIBC = pytest.mark.skipif(not launcher.glibc(), reason="glibc's tunables")


def test_tunables_appends_the_knobs_and_keeps_what_the_user_set() -> None:
    assert launcher.tunables() == KNOBS
    assert launcher.tunables("glibc.malloc.arena_max=2") == f"glibc.malloc.arena_max=2:{KNOBS}"
    mine = "glibc.malloc.tcache_count=3"
    assert launcher.tunables(mine) == f"{mine}:glibc.malloc.mxfast=0"  # the user's count wins


@GLIBC
def test_environment_adds_the_knobs_once_and_marks_what_it_added() -> None:
    env = launcher.environment({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env is not None
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{KNOBS}"
    assert env[launcher.MARKER] == KNOBS and env["PATH"] == "/bin"
    assert launcher.environment(env) is None  # started again: nothing more to do
    assert launcher.environment({"GLIBC_TUNABLES": KNOBS}) is None  # the user set both already
    assert launcher.environment({launcher.OPT_OUT: "default"}) is None
    # and back: what a process that should not have them gets (the bench's PEFT cases)
    assert launcher.without(env) == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert launcher.without(launcher.environment({}) or {}) == {}


def test_not_glibc_changes_nothing(monkeypatch) -> None:
    monkeypatch.setattr(launcher.sys, "platform", "darwin")
    assert launcher.glibc() is False and launcher.environment({}) is None


@GLIBC
def test_main_starts_the_command_again_with_the_knobs(monkeypatch) -> None:
    calls = []
    monkeypatch.delenv(launcher.MARKER, raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(launcher.OPT_OUT, raising=False)
    monkeypatch.setattr(launcher.sys, "argv", ["lorakit", "train", "--steps", "3"])
    monkeypatch.setattr(launcher.os, "execve", lambda *args: calls.append(args) or sys.exit(0))
    with pytest.raises(SystemExit):
        launcher.main()
    ((executable, argv, env),) = calls
    assert executable == sys.executable and argv[1:] == ["-m", "lorakit", "train", "--steps", "3"]
    assert env["GLIBC_TUNABLES"] == KNOBS


def test_the_console_script_is_started_again_not_python_m(tmp_path) -> None:
    """`python -m` would look in the working directory first (a `lorakit` folder there could shadow
    the package); the console script's own path does not."""
    script = tmp_path / "lorakit"
    script.write_text("")
    assert launcher.command_line([str(script), "chat"]) == [sys.executable, str(script), "chat"]
    assert launcher.command_line(["lorakit", "chat"]) == [sys.executable, "-m", "lorakit", "chat"]


def test_main_runs_the_cli_when_nothing_is_to_change(monkeypatch) -> None:
    import lorakit.cli

    ran = []
    monkeypatch.setenv(launcher.OPT_OUT, "default")
    monkeypatch.setattr(lorakit.cli, "main", lambda: ran.append(True))
    monkeypatch.setattr(launcher.os, "execve", lambda *args: pytest.fail("started again"))
    launcher.main()
    assert ran == [True]


@GLIBC
def test_the_command_started_again_sees_the_knobs_and_torch_was_never_imported(tmp_path) -> None:
    """End to end, through a real exec: a stand-in `lorakit` package (first on PYTHONPATH) prints
    what `python -m lorakit` started with; the first process had not imported torch (its 4 s would
    be paid twice)."""
    import os

    fake = tmp_path / "lorakit"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text(
        "import os, sys\nprint(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n"
    )
    probe = (
        "import sys, lorakit_launcher\n"
        "assert 'torch' not in sys.modules, 'torch imported before the exec'\n"
        "sys.argv = ['lorakit', 'train', '--steps', '3']\n"
        "lorakit_launcher.main()\n"
    )
    env = launcher.without(dict(os.environ))
    env.pop(launcher.OPT_OUT, None)
    env.pop("GLIBC_TUNABLES", None)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == f"{KNOBS} ['train', '--steps', '3']"

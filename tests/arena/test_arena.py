"""The arena end to end on a tiny model: 3 methods x 2 seeds, a failing method reported beside the
others, resume after a killed run, the report's figures equal to the run folders', bad input refused,
and the HTML report in a real headless Chromium (loads without console errors, sorts, shows images).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

TINY = ["--steps", "2", "--eval-limit", "4", "--general-questions", "4", "--general-tokens", "256",
        "--kl-prompts", "2", "--latency-tokens", "4", "--batch-size", "4", "--micro-batch-size", "4",
        "--train-args", "--replay none --max-length 64", "--no-progress-bar"]  # fmt: skip


def _arena(tiny_run_files: Path, out: Path, *args: str, **popen: Any) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lorakit", "arena", "--model", str(tiny_run_files / "base"), "--data",
               str(tiny_run_files / "train.jsonl"), "--out", str(out), *TINY, *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, **popen)


@pytest.fixture(scope="module")
def arena(tiny_run_files) -> Path:
    out = tiny_run_files / "arena"
    result = _arena(tiny_run_files, out, "--methods", "lora,dora,adapter", "--seeds", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_three_methods_two_seeds_end_to_end(arena) -> None:
    results = json.loads((arena / "results.json").read_text())
    assert list(results["arms"]) == ["lora", "dora", "adapter"]
    for name, arm in results["arms"].items():
        assert arm["done"] == 2 and not arm["failed"], name
        for key in ("exact_match", "answer_nll", "kl_from_base", "trainable_params", "step_s", "peak_rss_mb",
                    "unmerged_ms", "adapter_mb", "wall_s"):  # fmt: skip
            assert arm["metrics"][key] is not None and arm["metrics"][key]["n"] == 2, (name, key)
    assert results["arms"]["lora"]["metrics"]["merged_ms"]["n"] == 2
    assert results["arms"]["adapter"]["metrics"]["merged_ms"] is None  # an adapter cannot be merged
    assert "cannot merge" in results["arms"]["adapter"]["merged_note"]
    header = results["header"]
    assert (
        header["machine"]["cpu"]
        and header["machine"]["threads"] >= 1
        and header["commit"]
        and header["started"]
    )
    for name in ("report.md", "report.html", "score_vs_forgetting.png", "score_vs_params.png", "cost.png",
                 "loss_curves.png"):  # fmt: skip
        assert (arena / name).stat().st_size > 0, name
    assert "| lora | 2 |" in (arena / "report.md").read_text()


def test_the_report_says_what_the_run_folders_say(arena) -> None:
    results = json.loads((arena / "results.json").read_text())
    by_arm: dict[str, list[dict]] = {}
    for folder in sorted((arena / "runs").iterdir()):
        metrics = json.loads((folder / "metrics.json").read_text())
        status = json.loads((folder / "status.json").read_text())
        row = next(r for r in results["runs"] if r["run"] == folder.name)
        assert row["exact_match"] == metrics["after"]["exact_match"]
        assert row["answer_nll"] == metrics["after"]["answer_nll"]
        assert row["kl_from_base"] == metrics["after"]["kl_from_base"]
        assert row["trainable_params"] == metrics["train"]["trainable_params"]
        assert row["peak_rss_mb"] == status["peak_rss_mb"]
        assert row["adapter_mb"] * 1e6 == pytest.approx(sum(
            p.stat().st_size for p in (folder / "adapter").rglob("*") if p.is_file()))  # fmt: skip
        before, after = metrics["before"]["general_ppl"], metrics["after"]["general_ppl"]
        assert row["general_ppl_change"] == pytest.approx((after - before) / before)
        by_arm.setdefault(status["arm"], []).append(metrics)
    for name, runs in by_arm.items():
        answer = [m["after"]["answer_nll"] for m in runs]
        stats = results["arms"][name]["metrics"]["answer_nll"]
        assert stats["mean"] == pytest.approx(statistics.fmean(answer))
        assert stats["sd"] == pytest.approx(statistics.stdev(answer))
    table = (arena / "report.md").read_text()
    lora = results["arms"]["lora"]["metrics"]["answer_nll"]
    assert f"{lora['mean']:.3f} ± {lora['sd']:.3f}" in table


def test_a_failing_method_is_reported_and_the_others_complete(tiny_run_files) -> None:
    out = tiny_run_files / "failing"
    result = _arena(
        tiny_run_files, out, "--methods", "bitfit,lora", "--seeds", "1"
    )  # the tiny_run_files Llama has no biases
    assert result.returncode == 0, result.stderr[-3000:]
    status = json.loads((out / "runs" / "bitfit-s0" / "status.json").read_text())
    assert status["status"] == "failed" and status["error"].startswith("error:") and "bias" in status["error"]
    results = json.loads((out / "results.json").read_text())
    assert results["arms"]["bitfit"]["done"] == 0
    assert results["arms"]["bitfit"]["failed"][0]["error"] == status["error"]
    assert results["arms"]["lora"]["done"] == 1
    assert "bitfit seed 0: error:" in (out / "report.md").read_text()


def test_a_killed_arena_resumes_where_it_stopped(tiny_run_files) -> None:
    out = tiny_run_files / "killed"
    args = ["--methods", "lora,dora", "--seeds", "1"]
    # long enough (300 tiny_run_files steps) that the kill lands inside dora's training
    slow = [
        "--steps",
        "300",
        "--train-args",
        "--replay none --max-length 64 --checkpoint-every 1 --keep-checkpoints 1",
    ]
    command = [sys.executable, "-m", "lorakit", "arena", "--model", str(tiny_run_files / "base"), "--data",
               str(tiny_run_files / "train.jsonl"), "--out", str(out), *TINY, *slow, *args]  # fmt: skip
    child = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    dora = out / "runs" / "dora-s0"
    deadline = time.monotonic() + 300
    while not any((dora / "checkpoints").glob("step-*")):
        assert child.poll() is None, "the arena ended before dora checkpointed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)  # the arena and its training child, mid-run
    child.wait()
    assert (out / "runs" / "lora-s0" / "status.json").is_file() and not (dora / "status.json").exists()
    lora_status = (out / "runs" / "lora-s0" / "status.json").read_text()
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "runs" / "lora-s0" / "status.json").read_text() == lora_status  # not run again
    status = json.loads((dora / "status.json").read_text())
    assert status["status"] == "done" and status["resumed"] is True
    steps = [
        json.loads(line)["step"] for line in (dora / "log.jsonl").read_text().splitlines() if '"loss"' in line
    ]
    assert steps == list(range(1, 301))  # one line per step across the kill
    assert json.loads((out / "results.json").read_text())["arms"]["dora"]["done"] == 1


def test_matched_trainable_parameters(tiny_run_files) -> None:
    out = tiny_run_files / "matched"
    result = _arena(
        tiny_run_files, out, "--methods", "lora,adapter,prompt,norm", "--seeds", "1", "--match-params", "8000"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    header = json.loads((out / "arena.json").read_text())
    assert header["matched"]["lora"]["knob"] == "rank" and "note" in header["matched"]["norm"]
    results = json.loads((out / "results.json").read_text())
    for name in ("lora", "adapter", "prompt"):
        count = results["arms"][name]["metrics"]["trainable_params"]["mean"]
        step = header["matched"][name]["expected"] / header["matched"][name]["value"]  # one knob unit, about
        assert abs(count - 8000) <= step, (name, count)  # the nearest size to the target
        assert count == header["matched"][name]["expected"], name
    status = json.loads((out / "runs" / "lora-s0" / "status.json").read_text())
    assert status["args"][-4:] == ["--rank", str(header["matched"]["lora"]["value"]), "--alpha",
                                   str(2.0 * header["matched"]["lora"]["value"])]  # fmt: skip
    assert "Sized to about 8,000 trainable parameters: lora rank=" in (out / "report.md").read_text()


def test_bad_input_is_refused_in_one_line(tiny_run_files, tmp_path) -> None:
    result = _arena(tiny_run_files, tmp_path / "a", "--methods", "lora,nosuch")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(
        "error: --methods: unknown arm"
    )
    assert not (tmp_path / "a").exists()
    result = _arena(tiny_run_files, tmp_path / "b", "--methods", "longlora")
    assert result.returncode == 1 and "context-extension" in result.stderr
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "arena.json").write_text(json.dumps({"settings": {"steps": 99}, "started": "x"}))
    result = _arena(tiny_run_files, tmp_path / "c", "--methods", "lora")
    assert (
        result.returncode == 1
        and "holds an arena with other settings (steps=99 there, 2 here" in result.stderr
    )


def test_the_html_report_in_a_headless_browser(arena) -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    browser = Browser()
    try:
        browser.open((arena / "report.html").as_uri())
        assert browser.run("return document.readyState") == "complete"
        images = browser.run(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
        )
        assert len(images) == 4 and all(done and w > 100 and h > 100 for done, w, h in images), images
        column = browser.run(
            "return Array.from(document.querySelectorAll('#arena thead th')).findIndex(th => th.textContent === 'answer NLL')"
        )
        values = "return Array.from(document.querySelectorAll('#arena tbody tr')).map(r => Number(r.cells[arguments[0]].getAttribute('data-value')))"
        names = (
            "return Array.from(document.querySelectorAll('#arena tbody tr')).map(r => r.cells[0].textContent)"
        )
        browser.click(f"#arena thead th:nth-child({column + 1})")
        ascending = browser.run(values, column)
        assert ascending == sorted(ascending) and len(ascending) == 3
        browser.click(f"#arena thead th:nth-child({column + 1})")
        descending = browser.run(values, column)
        assert descending == sorted(ascending, reverse=True)
        browser.click("#arena thead th:nth-child(1)")  # the method names, alphabetically
        assert browser.run(names) == ["adapter", "dora", "lora"]
        errors = [e for e in browser.console() if e.get("level") == "SEVERE"]
        assert not errors, errors
    finally:
        browser.close()


# ---- a few WebDriver calls (the W3C protocol over HTTP) for Debian's headless Chromium -----------

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference


def skip_reason() -> str | None:
    if shutil.which("chromedriver") is None:
        return (
            "chromedriver is not installed (make test installs Debian's chromium and chromium-driver as root)"
        )
    if not any(Path(p).exists() for p in CHROMIUM):
        return "no Chromium binary (make test installs Debian's chromium as root)"
    return None


class Browser:
    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.driver = subprocess.Popen(
            [shutil.which("chromedriver"), f"--port={self.port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                self._call("GET", "/status")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    self.driver.kill()
                    raise
                time.sleep(0.1)
        binary = next(p for p in CHROMIUM if Path(p).exists())
        options = {
            "binary": binary,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        }
        caps = {
            "browserName": "chrome",
            "goog:chromeOptions": options,
            "goog:loggingPrefs": {"browser": "ALL"},
        }
        self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())["value"]

    def _session(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    def open(self, url: str) -> None:
        self._session("POST", "/url", {"url": url})

    def run(self, script: str, *args: Any) -> Any:
        return self._session("POST", "/execute/sync", {"script": script, "args": list(args)})

    def click(self, css: str) -> None:
        element = self._session("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]
        self._session("POST", f"/element/{element}/click", {})

    def console(self) -> list[dict[str, Any]]:
        """The browser console's entries so far (chromedriver's log endpoint)."""
        return self._session("POST", "/se/log", {"type": "browser"})

    def close(self) -> None:
        try:
            self._session("DELETE", "")
        finally:
            self.driver.kill()
            self.driver.wait()

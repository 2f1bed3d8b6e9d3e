"""The per-input router over trained task adapters: features from the base model's prompt only,
routing learned from a little data, pick = the adapter alone, weights = the weighted sum of the
changes, save/load, chat, and bad input refused clearly."""

from __future__ import annotations

import random

import pytest
import torch

import lorakit as lk
from lorakit.models import tiny_llama, tiny_tokenizer
from lorakit.routing import TaskRouter, load_task_adapters, prompt_features, prompt_ids, train_router


def _prompts(letters: str, n: int, seed: int) -> list[str]:
    """Two "tasks" a router can tell apart: words from different letters."""
    rng = random.Random(seed)
    return [" ".join("".join(rng.choice(letters) for _ in range(4)) for _ in range(5)) for _ in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("routing")
    folders = {}
    for i, name in enumerate(("abc", "xyz")):
        model = tiny_llama()
        torch.manual_seed(i)
        lk.apply(model, lk.LoRAConfig(rank=4, alpha=8, init="gaussian"))
        with torch.no_grad():  # a non-zero change, different per task
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.3)
        folders[name] = str(lk.save_adapter(model, tmp / name)[0])
    tokenizer = tiny_tokenizer()
    tasks = {"abc": _prompts("abc", 24, 0), "xyz": _prompts("xyz", 24, 1)}
    router = train_router(tiny_llama().eval(), tokenizer, tasks, folders, layer=1)
    return {"tmp": tmp, "folders": folders, "tokenizer": tokenizer, "router": router}


def _loaded(setup: dict, router: TaskRouter | None = None) -> torch.nn.Module:
    model = tiny_llama().eval()
    load_task_adapters(model, router or setup["router"])
    return model


def test_features_are_the_base_models_whatever_adapters_are_loaded(setup: dict) -> None:
    prompts = _prompts("abc", 3, 5)
    plain = prompt_features(tiny_llama().eval(), setup["tokenizer"], prompts, 1)
    adapted = _loaded(setup)
    lk.set_active(adapted, ["abc", "xyz"])
    torch.testing.assert_close(prompt_features(adapted, setup["tokenizer"], prompts, 1), plain)
    # padding does not change a prompt's features: alone or in a batch with a longer one
    alone = prompt_features(tiny_llama().eval(), setup["tokenizer"], prompts[:1], 1)
    torch.testing.assert_close(plain[:1], alone, rtol=1e-5, atol=1e-5)


def test_routes_held_out_prompts_to_their_task(setup: dict) -> None:
    model = _loaded(setup)
    router, tok = setup["router"], setup["tokenizer"]
    for name, letters in (("abc", "abc"), ("xyz", "xyz")):
        probs = router.probabilities(model, tok, _prompts(letters, 10, 99))
        assert (probs.argmax(-1) == router.names.index(name)).all()


def test_pick_equals_the_chosen_adapter_alone_and_weights_the_weighted_sum(setup: dict) -> None:
    model, tok = _loaded(setup), setup["tokenizer"]
    prompt = _prompts("xyz", 1, 7)[0]
    ids = torch.tensor([prompt_ids(tok, prompt)])
    logits = {}
    for name in ("abc", "xyz"):
        lk.set_active(model, [name])
        logits[name] = model(ids).logits
    with lk.disable_adapters(model):
        base = model(ids).logits
    with setup["router"].routed(model, tok, prompt) as choice:
        assert choice == {"xyz": 1.0}
        torch.testing.assert_close(model(ids).logits, logits["xyz"], rtol=0, atol=0)
    soft = TaskRouter.load(setup["router"].save(setup["tmp"] / "r"), mode="weights")
    with soft.routed(model, tok, prompt) as weights:
        assert sum(weights.values()) == pytest.approx(1.0) and set(weights) == {"abc", "xyz"}
        got = model(ids).logits
    # the layer outputs add w_i * delta_i; the logits are not linear in them, so compare layer-wise
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, layer.in_features)
    with lk.weighted_adapters(model, {"abc": 0.25, "xyz": 0.5}):
        mixed = layer(x)
    base_out = layer.base_layer(x)
    parts = {n: layer.adapters[n](x, base_out, layer) for n in ("abc", "xyz")}
    torch.testing.assert_close(
        mixed, base_out + 0.25 * parts["abc"] + 0.5 * parts["xyz"], rtol=1e-6, atol=1e-6
    )
    assert lk.active_adapters(model) == ["xyz"] and not layer.weights  # restored on exit
    assert not torch.allclose(got, base) and not torch.allclose(got, logits["xyz"])


def test_save_and_load_give_the_same_routing(setup: dict) -> None:
    model, tok = _loaded(setup), setup["tokenizer"]
    prompts = _prompts("abc", 4, 3) + _prompts("xyz", 4, 4)
    folder = setup["router"].save(setup["tmp"] / "saved")
    again = TaskRouter.load(folder)
    torch.testing.assert_close(
        again.probabilities(model, tok, prompts),
        setup["router"].probabilities(model, tok, prompts),
        rtol=0,
        atol=0,
    )
    assert again.adapters == setup["folders"] and again.mode == "pick"


def test_chat_routes_each_reply(setup: dict) -> None:
    from lorakit.generate import chat_repl

    model, tok = _loaded(setup), setup["tokenizer"]
    # each reply is routed on the whole conversation so far: /reset, so the second one starts afresh
    lines = iter([_prompts("xyz", 1, 11)[0], "/reset", _prompts("abc", 1, 12)[0], "/exit"])
    shown: list[str] = []
    route = setup["router"].chat_route(model, tok)
    chat_repl(
        model, tok, lambda _: next(lines), lambda *a, **k: shown.append(" ".join(map(str, a))), 3, route=route
    )
    assert "[xyz 1.00] " in shown and "[abc 1.00] " in shown
    assert lk.active_adapters(model) == ["xyz"]  # what load_task_adapters left active, restored


def test_bad_input_is_refused_clearly(setup: dict) -> None:
    tok, folders = setup["tokenizer"], setup["folders"]
    model = tiny_llama().eval()
    with pytest.raises(ValueError, match="must name the same tasks"):
        train_router(model, tok, {"abc": ["a"]}, folders)
    with pytest.raises(ValueError, match="at least two"):
        train_router(model, tok, {"abc": ["a"]}, {"abc": folders["abc"]})
    with pytest.raises(ValueError, match="no prompts for task"):
        train_router(model, tok, {"abc": ["a"], "xyz": []}, folders)
    with pytest.raises(ValueError, match="layer must be in 0..2"):
        train_router(model, tok, {"abc": ["a"], "xyz": ["x"]}, folders, layer=7)
    with pytest.raises(ValueError, match="3 adapter folders for a router over 2"):
        load_task_adapters(model, setup["router"], ["a", "b", "c"])
    wide = tiny_llama(hidden_size=48)
    with pytest.raises(ValueError, match="trained on another base model"):
        setup["router"].probabilities(wide, tok, ["abc"])
    with pytest.raises(FileNotFoundError, match="not a router folder"):
        TaskRouter.load(setup["tmp"])
    with pytest.raises(KeyError, match="not loaded"), setup["router"].routed(model, tok, "abc"):
        pass


def test_the_cli_refuses_adapters_without_a_router() -> None:
    from lorakit.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["chat", "--adapters", "a,b", "--model", "nowhere"])
    assert "--adapters goes with --router" in str(stop.value)
    with pytest.raises(SystemExit) as stop:
        main(["chat", "--adapter", "a", "--router", "r", "--model", "nowhere"])
    assert "exclude each other" in str(stop.value)


def test_the_router_command_trains_checks_and_writes(setup: dict, tmp_path, capsys) -> None:
    import json

    from lorakit.cli import main

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    files = {}
    for name, seed in (("abc", 20), ("xyz", 21)):
        files[name] = tmp_path / f"{name}.jsonl"
        rows = [{"prompt": p, "completion": "ok"} for p in _prompts(name, 20, seed)]
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    adapters = ",".join(f"{n}={f}" for n, f in setup["folders"].items())
    data = ",".join(f"{n}={f}" for n, f in files.items())
    main(
        ["router", "--adapters", adapters, "--data", data, "--out", str(tmp_path / "r"), "--model", str(base)]
    )
    out = capsys.readouterr().out
    assert "abc: 4/4 held-out prompts routed to its adapter" in out and "xyz: 4/4" in out
    assert TaskRouter.load(tmp_path / "r").names == ["abc", "xyz"]
    mixed = tmp_path / "mixed.jsonl"  # held-out items of both tasks, scored with each one's pick
    rows = [
        {"prompt": p, "completion": "ok"} for n, s in (("abc", 30), ("xyz", 31)) for p in _prompts(n, 2, s)
    ]
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["eval", "--router", str(tmp_path / "r"), "--model", str(base), "--data", str(files["abc"]),
          "--eval-data", str(mixed), "--eval-max-new-tokens", "3"])  # fmt: skip
    out = capsys.readouterr().out
    assert "routed exact match (pick):" in out and "of 4" in out
    assert "abc                      2 items" in out and "xyz                      2 items" in out
    for bad, says in (
        (["--data", f"abc={files['abc']}"], "must be the same tasks"),
        (["--data", "abc"], "NAME=VALUE pairs"),
    ):
        with pytest.raises(SystemExit) as stop:
            main(["router", "--adapters", adapters, "--out", str(tmp_path / "bad"), *bad])
        assert says in str(stop.value)
    assert not (tmp_path / "bad").exists()


def test_routed_exact_match_answers_each_item_with_its_pick(setup: dict) -> None:
    from lorakit.data.tasks import EvalItem
    from lorakit.routing import routed_exact_match
    from lorakit.train.evaluate import generate_answers

    model, tok = _loaded(setup), setup["tokenizer"]
    prompts = {"abc": _prompts("abc", 3, 21), "xyz": _prompts("xyz", 3, 22)}
    alone = {}
    for name, texts in prompts.items():  # the reference: each item answered by its task's adapter alone
        lk.set_active(model, [name])
        alone[name] = generate_answers(model, tok, [[{"role": "user", "content": t}] for t in texts], 6)
    items = [
        EvalItem([{"role": "user", "content": t}], alone[n][i])
        for n in prompts
        for i, t in enumerate(prompts[n])
    ]
    result = routed_exact_match(model, tok, setup["router"], items, lambda p, r: p == r, max_new_tokens=6)
    assert result["routing"] == {"abc": 3, "xyz": 3} and result["accuracy"] == 1.0
    swapped = [EvalItem(it.messages, alone["xyz" if i < 3 else "abc"][i % 3]) for i, it in enumerate(items)]
    assert alone["abc"] != alone["xyz"]  # the two adapters answer differently, so the check can fail
    assert (
        routed_exact_match(model, tok, setup["router"], swapped, lambda p, r: p == r, max_new_tokens=6)[
            "accuracy"
        ]
        < 1
    )
    soft = TaskRouter.load(setup["router"].save(setup["tmp"] / "soft"), mode="weights")
    weighted_result = routed_exact_match(model, tok, soft, items[:2], lambda p, r: True, max_new_tokens=6)
    assert weighted_result["mode"] == "weights" and weighted_result["n"] == 2

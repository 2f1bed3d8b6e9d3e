"""merge-adapters: the combinations against reference math written here and against PEFT's
add_weighted_adapter where the two define the same result; bad inputs refused before writing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorakit as lk
from lorakit.cli import main
from lorakit.combine import merge_adapters, read_source
from lorakit.core.state import AdapterLoadError
from lorakit.models import tiny_llama

OUT, IN = 12, 10
MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj")


def _folder(tmp: Path, name: str, rank: int, alpha: float, seed: int, **config: object) -> Path:
    """A PEFT LoRA folder with random (non-zero) A and B for MODULES."""
    gen = torch.Generator().manual_seed(seed)
    folder = tmp / name
    folder.mkdir()
    tensors = {}
    for module in MODULES:
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, IN, generator=gen)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(OUT, rank, generator=gen)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    body = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": ["q_proj", "down_proj"],
        "base_model_name_or_path": "m",
        **config,
    }
    (folder / "adapter_config.json").write_text(json.dumps(body))
    return folder


def _delta(folder: Path, module: str) -> torch.Tensor:
    """Reference: s * B @ A of one module, with PEFT's scale (alpha / r, rsLoRA alpha / sqrt r); an
    output folder has alpha = r, so the same formula reads it."""
    config = json.loads((folder / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    t = load_file(str(folder / "adapter_model.safetensors"))
    a = t[f"base_model.model.{module}.lora_A.weight"].double()
    b = t[f"base_model.model.{module}.lora_B.weight"].double()
    r = a.shape[0]
    alpha = config.get("alpha_pattern", {}).get(module.split(".")[-1], config["lora_alpha"])
    return alpha / (r**0.5 if config.get("use_rslora") else r) * b @ a


@pytest.fixture
def three(tmp_path: Path) -> list[Path]:
    return [
        _folder(tmp_path, "a", 2, 4.0, 0),
        _folder(tmp_path, "b", 3, 3.0, 1, use_rslora=True),
        _folder(tmp_path, "c", 1, 8.0, 2, alpha_pattern={"down_proj": 2.0}),
    ]


def test_linear_is_the_exact_weighted_sum_at_the_summed_rank(three: list[Path], tmp_path: Path) -> None:
    weights = [0.5, -1.0, 2.0]
    report = merge_adapters(three, tmp_path / "out", weights, "linear")
    assert report.rank == 6 and report.max_residual == 0
    for module in MODULES:
        expected = sum(w * _delta(f, module) for f, w in zip(three, weights, strict=True))
        torch.testing.assert_close(_delta(tmp_path / "out", module), expected, rtol=0, atol=1e-5)
    provenance = json.loads((tmp_path / "out" / "lorakit_merge.json").read_text())
    assert provenance["combination"] == "linear" and provenance["weights"] == weights


def test_svd_is_exact_at_full_rank_and_the_best_approximation_below(
    three: list[Path], tmp_path: Path
) -> None:
    merge_adapters(three, tmp_path / "full", [1, 1, 1], "svd")
    report = merge_adapters(three, tmp_path / "r2", [1, 1, 1], "svd", rank=2)
    for module in MODULES:
        expected = sum(_delta(f, module) for f in three)
        torch.testing.assert_close(_delta(tmp_path / "full", module), expected, rtol=0, atol=1e-5)
        u, s, vh = torch.linalg.svd(expected)
        best = u[:, :2] * s[:2] @ vh[:2]  # Eckart-Young
        torch.testing.assert_close(_delta(tmp_path / "r2", module), best, rtol=0, atol=1e-5)
        missed = (s[2:].square().sum() / s.square().sum()).sqrt()
        assert report.residual[module] == pytest.approx(float(missed), rel=1e-6)


def test_ties_matches_the_papers_steps(three: list[Path], tmp_path: Path) -> None:
    weights, density = [1.0, 0.5, 2.0], 0.3
    merge_adapters(three, tmp_path / "ties", weights, "ties", rank=min(OUT, IN), density=density)
    for module in MODULES:
        kept = []
        for f, w in zip(
            three, weights, strict=True
        ):  # trim: the top 30% of each weighted change by magnitude
            d = w * _delta(f, module)
            cut = d.abs().flatten().sort(descending=True).values[int(density * d.numel()) - 1]
            kept.append(torch.where(d.abs() >= cut, d, 0.0))
        stacked = torch.stack(kept)
        sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)  # elect
        agree = (stacked.sign() == sign).double()
        expected = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)  # disjoint mean
        torch.testing.assert_close(_delta(tmp_path / "ties", module), expected, rtol=0, atol=1e-5)


def test_dare_drops_and_rescales_and_is_seeded(tmp_path: Path) -> None:
    one = [_folder(tmp_path, "a", 4, 4.0, 0)]
    full = min(OUT, IN)
    merge_adapters(one, tmp_path / "d1", combination="dare_linear", rank=full, density=1.0)
    merge_adapters(one, tmp_path / "d", combination="dare_linear", rank=full, density=0.25, seed=3)
    merge_adapters(one, tmp_path / "same", combination="dare_linear", rank=full, density=0.25, seed=3)
    merge_adapters(one, tmp_path / "other", combination="dare_linear", rank=full, density=0.25, seed=4)
    shares = []
    for module in MODULES:
        reference = _delta(one[0], module)
        torch.testing.assert_close(_delta(tmp_path / "d1", module), reference, rtol=0, atol=1e-5)
        dropped = _delta(tmp_path / "d", module)
        kept = dropped.abs() > 1e-6
        torch.testing.assert_close(dropped[kept], reference[kept] / 0.25, rtol=1e-4, atol=1e-5)
        shares.append(float(kept.double().mean()))
        torch.testing.assert_close(_delta(tmp_path / "same", module), dropped, rtol=0, atol=0)
        assert not torch.allclose(_delta(tmp_path / "other", module), dropped)
    assert 0.1 < sum(shares) / len(shares) < 0.45  # 240 entries kept with p = 0.25


def test_dare_ties_at_density_one_is_ties_without_trim(three: list[Path], tmp_path: Path) -> None:
    merge_adapters(three, tmp_path / "dt", combination="dare_ties", rank=min(OUT, IN), density=1.0)
    merge_adapters(three, tmp_path / "t", combination="ties", rank=min(OUT, IN), density=1.0)
    for module in MODULES:
        torch.testing.assert_close(_delta(tmp_path / "dt", module), _delta(tmp_path / "t", module))


def test_a_module_missing_from_one_adapter_counts_as_no_change(tmp_path: Path) -> None:
    a = _folder(tmp_path, "a", 2, 2.0, 0)
    b = _folder(tmp_path, "b", 2, 2.0, 1)
    from safetensors.torch import load_file

    t = load_file(str(b / "adapter_model.safetensors"))
    save_file({k: v for k, v in t.items() if MODULES[1] not in k}, str(b / "adapter_model.safetensors"))
    merge_adapters([a, b], tmp_path / "out", combination="linear")
    torch.testing.assert_close(_delta(tmp_path / "out", MODULES[1]), _delta(a, MODULES[1]), rtol=0, atol=1e-5)


# ---- against PEFT ------------------------------------------------------------------------------


def _peft_pair(tmp_path: Path) -> tuple[object, list[Path]]:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = peft.get_peft_model(tiny_llama(), config, adapter_name="x")
    model.add_adapter("y", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(str(tmp_path / "peft"))  # non-default adapters go to sub-folders
    return model, [tmp_path / "peft" / "x", tmp_path / "peft" / "y"]


def _peft_delta(model: object, adapter: str) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():  # type: ignore[attr-defined]
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            out[name.removeprefix("base_model.model.")] = module.get_delta_weight(adapter).double()
    return out


@pytest.mark.parametrize(
    ("ours", "theirs", "extra"),
    [
        ("linear", "cat", {}),
        ("svd", "svd", {"rank": 3}),
        ("ties", "ties_svd", {"rank": 5, "density": 0.4}),
    ],
)
def test_same_result_as_peft_add_weighted_adapter(
    tmp_path: Path, ours: str, theirs: str, extra: dict[str, float]
) -> None:
    model, paths = _peft_pair(tmp_path)
    weights = [0.7, 0.7] if ours == "ties" else [0.7, -1.3]  # PEFT elects TIES signs unweighted
    kwargs = {"svd_rank": extra["rank"]} if "rank" in extra else {}
    if "density" in extra:
        kwargs["density"] = extra["density"]
    model.add_weighted_adapter(["x", "y"], weights, "merged", combination_type=theirs, **kwargs)  # type: ignore[attr-defined]
    merge_adapters(paths, tmp_path / "ours", weights, ours, **extra)  # type: ignore[arg-type]
    reference = _peft_delta(model, "merged")
    source = read_source(tmp_path / "ours")
    assert set(source.factors) == set(reference)
    for module, (b, a, scale) in source.factors.items():
        torch.testing.assert_close(scale * b @ a, reference[module], rtol=0, atol=1e-5)


def test_peft_loads_the_merged_folder_and_gives_base_plus_the_sum(tmp_path: Path, peft_logits) -> None:
    model, paths = _peft_pair(tmp_path)
    merge_adapters(paths, tmp_path / "ours", [1.0, 0.5], "linear")
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    theirs = peft_logits(tiny_llama, tmp_path / "ours", ids)
    plain = tiny_llama().eval()
    deltas = [_peft_delta(model, "x"), _peft_delta(model, "y")]
    with torch.no_grad():
        for name, module in plain.named_modules():
            change = sum(w * d[name] for w, d in zip((1.0, 0.5), deltas, strict=True) if name in d)
            if isinstance(change, torch.Tensor):
                module.weight += change.float()
        expected = plain(ids).logits
    torch.testing.assert_close(theirs, expected, rtol=1e-4, atol=1e-4)


# ---- bad input -----------------------------------------------------------------------------------


def _refused(tmp_path: Path, match: str, *args: object, **kwargs: object) -> None:
    with pytest.raises((ValueError, AdapterLoadError), match=match):
        merge_adapters(*args, out=tmp_path / "out", **kwargs)  # type: ignore[misc]
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_refused_before_anything_is_written(three: list[Path], tmp_path: Path) -> None:
    _refused(tmp_path, "3 weights for 2 adapters", three[:2], weights=[1, 1, 1])
    _refused(tmp_path, "combination must be one of", three, combination="cat")
    _refused(tmp_path, "density", three, combination="ties", density=0)
    _refused(tmp_path, "keeps every entry", three, combination="svd", density=0.5)
    _refused(tmp_path, "use --combination svd", three, combination="linear", rank=2)
    _refused(tmp_path, "rank must be a positive", three, combination="svd", rank=0)
    dora = _folder(tmp_path, "dora", 2, 2.0, 5, use_dora=True)
    _refused(tmp_path, "DoRA adapter", [three[0], dora])
    quantum = _folder(tmp_path, "q", 2, 2.0, 6)
    (quantum / "adapter_config.json").write_text(json.dumps({"peft_type": "QUANTUM_PEFT"}))
    _refused(tmp_path, "lorakit export", [quantum])
    other = _folder(tmp_path, "other", 2, 2.0, 7, base_model_name_or_path="another")
    _refused(tmp_path, "different base models", [three[0], other])
    wide = tmp_path / "wide"
    wide.mkdir()
    save_file(
        {
            f"base_model.model.{MODULES[0]}.lora_A.weight": torch.ones(2, IN + 1),
            f"base_model.model.{MODULES[0]}.lora_B.weight": torch.ones(OUT, 2),
        },
        str(wide / "adapter_model.safetensors"),
    )
    (wide / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]})
    )
    _refused(tmp_path, "different models", [three[0], wide])
    saved = _folder(tmp_path, "saved", 2, 2.0, 8)
    t = {"base_model.model.lm_head.modules_to_save.default.weight": torch.ones(3, 3)}
    save_file(t, str(saved / "adapter_model.safetensors"))
    _refused(tmp_path, "not a LoRA factor", [saved])
    _refused(tmp_path, "does not exist", [tmp_path / "nowhere"])


def test_cli_writes_the_folder_and_reports_bad_input_in_one_line(
    three: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = ["merge-adapters", *map(str, three[:2]), "--out", str(tmp_path / "o")]
    main([*cli, "--combination", "svd", "--rank", "3", "--weights", "0.5,0.5"])
    assert "rank 3" in capsys.readouterr().out and (tmp_path / "o" / "adapter_model.safetensors").is_file()
    for bad, says in ((["--weights", "1"], "1 weights for 2 adapters"), (["--weights", "a,b"], "numbers")):
        with pytest.raises(SystemExit) as stop:
            main([*cli, *bad])
        assert says in str(stop.value) and "\n" not in str(stop.value)


def test_the_api_exports_it() -> None:
    assert lk.merge_adapters is merge_adapters

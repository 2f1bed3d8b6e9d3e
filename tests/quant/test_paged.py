"""The paged AdamW gives torch's AdamW results, with its states in the pool."""

from __future__ import annotations

import pytest
import torch

from lorakit.quant.paged import PagedAdamW, StatePool


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(7, 5), (5,), (3, 4)]]


def _run(make_opt, steps: int = 6) -> list[torch.Tensor]:
    params = _params()
    opt = make_opt(
        [{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 3e-3, "weight_decay": 0.1}]
    )
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


@pytest.mark.parametrize("pool", ["mmap", "memory"])
def test_same_results_as_torch_adamw(pool: str) -> None:
    kwargs = {"betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.01}
    ours, opt = _run(lambda g: PagedAdamW(g, pool=pool, **kwargs))
    theirs, _ = _run(lambda g: torch.optim.AdamW(g, foreach=False, **kwargs))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-7, rtol=1e-6)
    state = next(iter(opt.state.values()))
    assert state["exp_avg"].untyped_storage().filename is not None if pool == "mmap" else True


def test_state_dict_round_trip_continues_identically() -> None:
    params, opt = _run(lambda g: PagedAdamW(g, pool="mmap"), steps=3)
    saved = opt.state_dict()
    fresh = PagedAdamW([{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 3e-3}], pool="mmap")
    fresh.load_state_dict(saved)
    for key in ("exp_avg", "exp_avg_sq"):
        for p in params:
            torch.testing.assert_close(fresh.state[p][key], opt.state[p][key], atol=0, rtol=0)


def test_bad_pool_is_refused() -> None:
    with pytest.raises(ValueError, match="pool kind"):
        StatePool("disk")

"""Quantum-PEFT (Koike-Akino et al., ICLR 2025, arXiv 2503.05431): a rank-K update whose orthonormal
factors come from Pauli-rotation circuits, so each factor costs (2L+1)q - 2L angles, q = ceil(log2 N).

    dW = alpha * U diag(lam) V^T       U = Q(theta_U)[:N_out, :K]    V = Q(theta_V)[:N_in, :K]

Q(theta) is a real circuit on q "qubits" (an SO(2^q) matrix that is never built): RY(theta0_i) on
every qubit, then L layers of, for each neighbouring pair (p, p+1), CZ then RY on p and on p+1.
Only its first K columns are computed: the K basis vectors as a (2,)*q x K tensor, each gate applied
along its axes (`circuit_columns`). The paper's exact circuit is not public; this ladder is the one
consistent with the reviewed parameter count (docs/methods/quantum.md). For N not a power of two the
first N rows are taken and, in the default "qr" mode, re-orthonormalised by a QR (signs fixed so
that diag(R) > 0); "truncate" skips the QR and is not orthonormal.

Init: lam = 0, so the model starts as the base; angles uniform in (-pi, pi] (all-zero angles would
make U pick the first K coordinates). With lam = 0 the angles get no gradient at the first step (lam
gets it), as LoRA's A when B = 0; from the second step on both train.

All factors of one adapter are built together, once per decoder call, through the per-forward
context (core/context.py): the modules whose factors have the same q and K form one batched circuit,
so a forward runs a few dozen gate applications, not one set per module. Without gradients the
factors are cached and rebuilt only when an angle changes. Merging is exact (a fixed weight change).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..core.context import Contributor, ForwardContext
from ..core.contract import AdaptedLayer, Delta, Role
from ..core.target import TargetSpec

NONPOW2 = ("qr", "truncate")
ANSATZ = "ry_cz_ladder"


def qubits(n: int) -> int:
    return max(1, math.ceil(math.log2(n)))


def angles_per_factor(n: int, layers: int) -> int:
    """(2L+1) q - 2L: q first rotations, then 2 per neighbouring pair per layer."""
    q = qubits(n)
    return q + 2 * layers * (q - 1)


def _ry(theta: Tensor) -> Tensor:
    """(...,) angles -> (..., 2, 2) rotations [[cos, -sin], [sin, cos]] of theta / 2."""
    c, s = torch.cos(theta / 2), torch.sin(theta / 2)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _product_columns(first: Tensor, k: int) -> Tensor:
    """The first layer (RY on every qubit) applied to the first k basis vectors, in closed form:
    column j is the Kronecker product over qubits i of RY(first[:, i])'s column bit_i(j) (qubit 0 is
    the most significant bit). (M, q) -> (M, 2^q, k)."""
    m, q = first.shape
    rot = _ry(first)  # (M, q, 2, 2)
    j = torch.arange(k, device=first.device)
    out = rot[:, 0][:, :, (j >> (q - 1)) & 1]  # (M, 2, k)
    for i in range(1, q):
        column = rot[:, i][:, :, (j >> (q - 1 - i)) & 1]  # (M, 2, k)
        out = (out[:, :, None, :] * column[:, None, :, :]).reshape(m, -1, k)
    return out


def _pair_gates(ladder: Tensor) -> Tensor:
    """(..., 2) angle pairs -> (..., 4, 4): CZ on a neighbouring pair, then RY on each of the two,
    as one gate (RY(a) kron RY(b)) diag(1, 1, 1, -1)."""
    a, b = _ry(ladder[..., 0]), _ry(ladder[..., 1])
    gate = (a[..., :, None, :, None] * b[..., None, :, None, :]).reshape(*a.shape[:-2], 4, 4)
    return gate * torch.tensor([1.0, 1.0, 1.0, -1.0], dtype=gate.dtype, device=gate.device)


def circuit_columns(first: Tensor, ladder: Tensor, k: int) -> Tensor:
    """The first k columns of M circuits at once: first (M, q), ladder (M, L, q-1, 2) -> (M, 2^q, k).
    The first layer is a product state (closed form); each CZ with its two RYs is one 4x4 gate on
    two neighbouring axes, so a circuit is L (q-1) passes over the (M, 2^q, k) state."""
    m, q = first.shape
    x = _product_columns(first, k)
    gates = _pair_gates(ladder)  # (M, L, q-1, 4, 4)
    for layer in range(ladder.shape[1]):
        for p in range(q - 1):  # qubits p, p+1: the state as (M, 2^p, 4, rest)
            pair = x.reshape(m, 2**p, 4, -1)
            x = torch.einsum("mij,majb->maib", gates[:, layer, p], pair).reshape(m, 2**q, k)
    return x


def orthonormal_rows(columns: Tensor, n: int, mode: str) -> Tensor:
    """(M, 2^q, K) -> (M, n, K): the first n rows; "qr" re-orthonormalises them."""
    top = columns[:, :n]
    if mode == "truncate" or n == columns.shape[1]:
        return top
    q, r = torch.linalg.qr(top)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    return q * torch.where(signs == 0, 1.0, signs)[:, None, :]


@dataclass
class QuantumPEFTConfig:
    """rank: K, the update's rank; layers: L, the circuit's entangling layers; alpha: the scale of
    U diag(lam) V^T; nonpow2: "qr" (orthonormal, default) or "truncate" for N not a power of two."""

    rank: int = 8
    layers: int = 2
    alpha: float = 1.0
    target_modules: TargetSpec = "all-linear"
    exclude_modules: TargetSpec = None
    nonpow2: str = "qr"
    seed: int = 0

    peft_type: ClassVar[str] = "QUANTUM_PEFT"
    default_lr: ClassVar[float] = 1e-1  # from the sweep and full runs in docs/methods/quantum.md
    run_defaults: ClassVar[dict[str, Any]] = {"alpha": 1.0, "rank": 8}  # `lorakit train`'s, not LoRA's

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank (K) must be a positive integer, got {self.rank}")
        if self.layers < 1:
            raise ValueError(f"layers (L) must be at least 1, got {self.layers}")
        if self.nonpow2 not in NONPOW2:
            raise ValueError(f"nonpow2 must be one of {NONPOW2}, got {self.nonpow2!r}")

    def build(self, layer: AdaptedLayer, path: str) -> Delta:
        if layer.is_embedding:
            raise ValueError(f"Quantum-PEFT adapts linear layers; {path} is an embedding")
        smaller = min(layer.in_features, layer.out_features)
        if self.rank > smaller:
            raise ValueError(
                f"rank K={self.rank} is larger than {path}'s smaller dimension ({smaller}); "
                f"a rank-K update needs K <= min(in, out): lower --rank or exclude {path}"
            )
        seed = self.seed * 1_000_003 + sum(ord(c) * 31**i for i, c in enumerate(path)) % 1_000_003
        return QuantumDelta(layer, self, torch.Generator().manual_seed(seed))

    def context_contributor(self, name: str) -> Contributor:
        """All factors of adapter `name`, built once per decoder call (see the module docstring)."""
        cache: dict[str, Any] = {}

        def contribute(context: ForwardContext, on: bool) -> dict[int, tuple[Tensor, Tensor]] | None:
            deltas = context.members.get(name, []) if on else []
            return build_factors(deltas, cache) if deltas else None

        return contribute

    def to_peft_dict(self) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type,
            "task_type": "CAUSAL_LM",
            "r": self.rank,
            "circuit_layers": self.layers,
            "alpha": self.alpha,
            "nonpow2": self.nonpow2,
            "ansatz": ANSATZ,
            "seed": self.seed,
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
            "format": "lorakit: quantum_theta_{u,v}_first (q), quantum_theta_{u,v}_ladder (L, q-1, 2), quantum_lambda (K)",
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> QuantumPEFTConfig:
        if d.get("ansatz", ANSATZ) != ANSATZ:
            raise ValueError(
                f"this Quantum-PEFT adapter uses ansatz {d.get('ansatz')!r}; lorakit builds {ANSATZ!r}"
            )
        targets = d.get("target_modules")
        return cls(
            rank=int(d["r"]),
            layers=int(d["circuit_layers"]),
            alpha=float(d.get("alpha", 1.0)),
            target_modules=sorted(targets) if isinstance(targets, list) else targets,
            nonpow2=str(d.get("nonpow2", "qr")),
            seed=int(d.get("seed", 0)),
        )


class QuantumDelta(Delta):
    """One layer's angles and lam; its factors U (out, K) and V (in, K) come from the context."""

    roles: ClassVar[dict[str, Role]] = {
        "theta_u_first": Role.ANGLE,
        "theta_u_ladder": Role.ANGLE,
        "theta_v_first": Role.ANGLE,
        "theta_v_ladder": Role.ANGLE,
        "lam": Role.SINGULAR,
    }
    peft_keys: ClassVar[dict[str, str]] = {
        "theta_u_first": "quantum_theta_u_first",
        "theta_u_ladder": "quantum_theta_u_ladder",
        "theta_v_first": "quantum_theta_v_first",
        "theta_v_ladder": "quantum_theta_v_ladder",
        "lam": "quantum_lambda",
    }
    needs_context: ClassVar[bool] = True

    def __init__(self, layer: AdaptedLayer, config: QuantumPEFTConfig, gen: torch.Generator) -> None:
        super().__init__()
        device = layer.base_layer.weight.device
        self.n_out, self.n_in, self.rank = layer.out_features, layer.in_features, config.rank
        self.scale, self.mode = float(config.alpha), config.nonpow2
        q_out, q_in, layers = qubits(self.n_out), qubits(self.n_in), config.layers

        def angles(*shape: int) -> nn.Parameter:
            return nn.Parameter((torch.rand(*shape, generator=gen) * 2 - 1).mul_(math.pi).to(device))

        self.theta_u_first, self.theta_u_ladder = angles(q_out), angles(layers, q_out - 1, 2)
        self.theta_v_first, self.theta_v_ladder = angles(q_in), angles(layers, q_in - 1, 2)
        self.lam = nn.Parameter(torch.zeros(self.rank, device=device))

    def factors(self) -> tuple[Tensor, Tensor]:
        """(U, V) of this layer alone (merging, export); the same values the batched build gives,
        in the angles' dtype (fp32: U^T U = I to about 1e-6)."""
        return build_factors([self], {})[id(self)]

    def forward(self, x: Tensor, base_out: Tensor, layer: AdaptedLayer) -> Tensor:
        built = self.context_value
        u, v = built[id(self)] if built is not None else self.factors()  # (out, K), (in, K)
        if torch.is_autocast_enabled(x.device.type):
            h = F.linear(x, v.T)  # (..., K)
        else:
            h = F.linear(x.to(v.dtype), v.T)
        return (F.linear(h * (self.scale * self.lam), u)).to(base_out.dtype)  # (..., out)

    def as_lora(self) -> tuple[Tensor, Tensor]:
        """The same change as a LoRA pair: A = alpha diag(lam) V^T (K, in), B = U (out, K)."""
        u, v = self.factors()
        return (self.scale * self.lam[:, None] * v.T).detach(), u.detach()

    def delta_weight(self) -> Tensor:
        u, v = self.factors()
        return self.scale * (u.double() * self.lam.double()) @ v.double().T  # (out, in)

    def merged_weight(self, weight: Tensor) -> Tensor:
        return (weight.double() + self.delta_weight()).to(weight.dtype)

    def unmerged_weight(self, weight: Tensor) -> Tensor:
        return (weight.double() - self.delta_weight()).to(weight.dtype)

    def angle_versions(self) -> tuple[int, ...]:
        return tuple(getattr(self, a)._version for a in self.peft_keys if a != "lam") + (id(self),)


# Circuits built in one batch: autograd keeps one (M, 2^q, K) tensor per gate while a batch's
# backward runs (about 46 gates at q = 10, L = 2), so the batch bounds that transient memory.
CIRCUITS_AT_ONCE = 32


def _factor_rows(first: Tensor, ladder: Tensor, k: int, n: int, mode: str) -> Tensor:
    return orthonormal_rows(circuit_columns(first, ladder, k), n, mode)


def build_factors(deltas: list[QuantumDelta], cache: dict[str, Any]) -> dict[int, tuple[Tensor, Tensor]]:
    """(U, V) for every delta: one batched circuit per (q, K, L) group of factors. Without gradients
    the result is kept in `cache` until an angle changes."""
    grad = torch.is_grad_enabled() and any(d.theta_u_first.requires_grad for d in deltas)
    key = None if grad else tuple(v for d in deltas for v in d.angle_versions())
    if key is not None and cache.get("key") == key:
        return cache["factors"]
    groups: dict[tuple[int, ...], list[tuple[QuantumDelta, str]]] = {}
    for d in deltas:
        for side, n in (("u", d.n_out), ("v", d.n_in)):
            ladder = getattr(d, f"theta_{side}_ladder")  # (L, q-1, 2)
            groups.setdefault((ladder.shape[0], ladder.shape[1] + 1, d.rank, n), []).append((d, side))
    built: dict[tuple[int, str], Tensor] = {}
    for (_, _, k, n), group in groups.items():
        for at in range(0, len(group), CIRCUITS_AT_ONCE):
            members = group[at : at + CIRCUITS_AT_ONCE]
            first = torch.stack([getattr(d, f"theta_{s}_first") for d, s in members])  # (M, q)
            ladder = torch.stack([getattr(d, f"theta_{s}_ladder") for d, s in members])  # (M, L, q-1, 2)
            mode = members[0][0].mode
            if grad:  # keep only the angles for backward; the gates are recomputed there
                rows = checkpoint(_factor_rows, first, ladder, k, n, mode, use_reentrant=False)
            else:
                rows = _factor_rows(first, ladder, k, n, mode)  # (M, n, K)
            for i, (d, s) in enumerate(members):
                built[(id(d), s)] = rows[i]
    factors = {id(d): (built[(id(d), "u")], built[(id(d), "v")]) for d in deltas}
    if not grad:
        cache.update(key=key, factors=factors)
    else:
        cache.clear()
    return factors

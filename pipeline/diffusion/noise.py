"""Per-query Gaussian noise that depends only on (seed, query id, position).

Each query gets a 64-bit key = blake2b(seed, id) (never Python's salted `hash()`). Its noise is a
counter-based stream: value j of query q is a pure function of (key_q, j) (splitmix64 mixing +
Box-Muller), computed for all queries at once on any device. So a query's starting noise is the
same whatever batch, chunk, rank or device it runs on, and drawing it costs one vectorised op
instead of one torch.Generator per query.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


def _signed(u: int) -> int:
    """uint64 -> the int64 with the same bits."""
    u &= _MASK64
    return u - (1 << 64) if u >= 1 << 63 else u


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def query_keys(ids: Sequence[str], seed: int) -> Tensor:
    """Stable 64-bit key per id: blake2b(f"{seed}/{id}") -> [Q] int64 (CPU)."""
    digests = (hashlib.blake2b(f"{seed}/{i}".encode(), digest_size=8).digest() for i in ids)
    keys = [_signed(int.from_bytes(d, "little")) for d in digests]
    return torch.tensor(keys, dtype=torch.int64)


def _srl(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bits."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: Tensor) -> Tensor:
    """splitmix64 finaliser on int64 tensors (two's-complement wrap-around = uint64 arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ _srl(z, 30)) * _M1
    z = (z ^ _srl(z, 27)) * _M2
    return z ^ _srl(z, 31)


def _uniform(bits: Tensor) -> Tensor:
    """Top 53 bits -> float64 in (0, 1]."""
    return (_srl(bits, 11).double() + 1.0) * (1.0 / (1 << 53))


def seeded_normal(
    keys: Tensor, n: int, offset: int = 0, device: torch.device | str | None = None,
) -> Tensor:
    """Normal values offset..offset+n-1 of each key's stream. keys [Q] -> [Q, n] float32."""
    keys = keys.to(device or keys.device, torch.int64)
    j = torch.arange(offset, offset + n, device=keys.device, dtype=torch.int64)
    base = splitmix64(keys)[:, None] + 2 * j[None, :] * _GOLDEN  # distinct counter per value
    u1 = _uniform(splitmix64(base))
    u2 = _uniform(splitmix64(base + _GOLDEN))
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return z.float()

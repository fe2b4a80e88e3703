"""Gaussian diffusion over candidate-score vectors: the beta schedule and its verbs.

The schedule is computed in float64 and stored as float32 buffers. Timesteps are 0-based:
t = 0 is the least noisy step, t = T - 1 the noisiest; `t_prev = -1` means "clean" (abar = 1).
The network predicts x0 (DiffusionRet), so the sampler turns x0_hat into the implied noise and
takes a DDIM step (eta = 0: deterministic; eta = 1: DDPM-like ancestral noise).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

DenoiseFn = Callable[[Tensor, Tensor], Tensor]  # (x_t [B, ...], t [B] long) -> x0_hat [B, ...]


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal: abar(t) = cos^2(((t/T) + s)/(1 + s) * pi/2) / abar(0). -> [T] float64."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def linear_betas(timesteps: int, start: float = 1e-4, end: float = 0.02) -> Tensor:
    """DDPM linear betas, rescaled so any T spans the noise of T = 1000. -> [T] float64."""
    scale = 1000.0 / timesteps
    betas = torch.linspace(start * scale, end * scale, timesteps, dtype=torch.float64)
    return betas.clamp(max=0.999)


SCHEDULES: dict[str, Callable[[int], Tensor]] = {"cosine": cosine_betas, "linear": linear_betas}


def respaced_timesteps(timesteps: int, steps: int) -> list[int]:
    """`steps` timesteps evenly spread over [T-1, 0], descending (all T when steps == T)."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"sampling steps must be in [1, {timesteps}], got {steps}")
    if steps == 1:
        return [timesteps - 1]
    # spacing (T-1)/(steps-1) >= 1, so the rounded values are distinct
    return [round((timesteps - 1) * (1 - i / (steps - 1))) for i in range(steps)]


class GaussianDiffusion(nn.Module):
    """Named buffers of one schedule (non-persistent: they never enter a checkpoint) + verbs."""

    betas: Tensor
    alphas_cumprod: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor

    def __init__(self, timesteps: int = 50, schedule: str = "cosine") -> None:
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r} (known: {', '.join(SCHEDULES)})")
        if timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps}")
        self.timesteps = timesteps
        self.schedule = schedule
        betas = SCHEDULES[schedule](timesteps)  # float64
        abar = torch.cumprod(1 - betas, 0)
        for name, value in {
            "betas": betas,
            "alphas_cumprod": abar,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(),
        }.items():
            self.register_buffer(name, value.float(), persistent=False)

    # ------------------------------------------------------------------------------------------
    def _at(self, buf: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """buf[t] shaped to broadcast against `like` ([B] -> [B, 1, ...])."""
        t = torch.as_tensor(t, device=buf.device, dtype=torch.long)
        out = buf[t].to(like.dtype)
        return out.reshape(out.shape + (1,) * (like.ndim - out.ndim))

    def abar_prev(self, t_prev: Tensor, like: Tensor) -> Tensor:
        """alphas_cumprod at t_prev with abar(-1) = 1, broadcast against `like`."""
        t_prev = torch.as_tensor(t_prev, device=self.alphas_cumprod.device, dtype=torch.long)
        one = torch.ones((), device=self.alphas_cumprod.device)
        vals = torch.where(t_prev >= 0, self.alphas_cumprod[t_prev.clamp(min=0)], one)
        vals = vals.to(like.dtype)
        return vals.reshape(vals.shape + (1,) * (like.ndim - vals.ndim))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise. x0, noise [B, ...], t [B] long."""
        return (
            self._at(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """The noise implied by (x_t, x0_hat): (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
        return (x_t - self._at(self.sqrt_alphas_cumprod, t, x_t) * x0) / self._at(
            self.sqrt_one_minus_alphas_cumprod, t, x_t
        )

    def ddim_step(
        self,
        x_t: Tensor,
        t: Tensor,
        t_prev: Tensor,
        x0_hat: Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """One DDIM update x_t -> x_{t_prev} given x0_hat (t_prev = -1: return the clean x0_hat).

        sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)); the fresh
        noise (only used when eta > 0) is `noise` if given, else drawn from `generator`.
        """
        eps = self.predict_eps_from_x0(x_t, t, x0_hat)
        abar_t = self._at(self.alphas_cumprod, t, x_t)
        abar_p = self.abar_prev(t_prev, x_t)
        sigma = eta * ((1 - abar_p) / (1 - abar_t) * (1 - abar_t / abar_p)).clamp(min=0).sqrt()
        x_prev = abar_p.sqrt() * x0_hat + (1 - abar_p - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0:
            if noise is None:
                noise = torch.randn(
                    x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype
                )
            x_prev = x_prev + sigma * noise
        return x_prev

    @torch.no_grad()
    def sample(
        self,
        denoise_fn: DenoiseFn,
        shape: tuple[int, ...],
        steps: int | None = None,
        eta: float = 0.0,
        noise: Tensor | None = None,
        clamp: tuple[float, float] | None = (-1.0, 1.0),
        generator: torch.Generator | None = None,
        step_noise: Tensor | None = None,
    ) -> Tensor:
        """Full DDIM loop from x_T ~ N(0, I) over `steps` respaced timesteps; returns x0 [shape].

        noise: the starting x_T [shape] (else drawn from `generator`). step_noise: [steps, *shape]
        fresh noise for eta > 0 (else drawn from `generator`). clamp bounds each x0_hat.
        """
        steps = steps or self.timesteps
        device = self.alphas_cumprod.device
        x = noise if noise is not None else torch.randn(shape, generator=generator, device=device)
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(x.shape)}, expected {tuple(shape)}")
        ts = respaced_timesteps(self.timesteps, steps)
        batch = shape[0]
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            t_vec = torch.full((batch,), t, device=x.device, dtype=torch.long)
            x0_hat = denoise_fn(x, t_vec)
            if clamp is not None:
                x0_hat = x0_hat.clamp(*clamp)
            x = self.ddim_step(
                x, t_vec, torch.full_like(t_vec, t_prev), x0_hat, eta, generator,
                None if step_noise is None else step_noise[i],
            )
        return x

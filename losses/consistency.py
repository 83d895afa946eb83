"""Consistency distillation (Song et al. 2023, "Consistency models", Algorithm 2) in the latent
consistency form (Luo et al. 2023, "Latent consistency models", Algorithm 1).

The student is boundary-conditioned, ``f(x, t) = c_skip(t) x + c_out(t) x0_G(x, t)`` (``c_skip(0) = 1``).
On a skip grid ``t_n = (n + 1) k - 1`` (LCM: ``k = 20``, 50 points for T = 1000), a pair ``t > s = t - k``
(``s`` clamped at 0) is drawn; ``x_t = alpha_t x + sigma_t eps`` from data; one teacher ODE step (DDIM, or
Heun) from ``x_t`` gives ``x_s``, with classifier-free guidance drawn per sample from a range for text
teachers; the loss is ``d(f_G(x_t, t), sg f_target(x_s, s))`` with ``d`` L2 or pseudo-Huber
``sqrt(|a - b|² + c²) - c`` (Song & Dhariwal 2023, eq. 4), and the target network an EMA of the student
(rate 0.95), or the online student without gradient (``target_ema: null``, LCM-LoRA). Multistep
sampling predicts ``f`` and renoises.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from fastgen.errors import UsageError
from fastgen.denoiser import BaseDenoiser, BoundaryDenoiser
from fastgen.losses.base import Objective, unwrap_denoiser
from fastgen.samplers.solvers import Guidance, ddim_step, denoise


@dataclass
class ConsistencyConfig:
    skip: int = 20                     # k: grid spacing in the teacher's native time (LCM: 20 → 50 points)
    solver: str = "ddim"               # teacher ODE step: "ddim" or "heun"
    distance: str = "huber"            # "l2" or "huber" (pseudo-Huber)
    huber_c: float = 0.001             # pseudo-Huber c (LCM)
    target_ema: float | None = 0.95    # EMA rate of the target network; None = online student without grad
    guidance_min: float = 1.0          # Ho–Salimans CFG scale range of the teacher step (LCM: w in [5, 15]
    guidance_max: float = 1.0          # in c + w (c - u), i.e. scale in [6, 16]); 1 = no guidance
    sigma_data: float = 0.5            # boundary condition c_skip, c_out (LCM)
    timestep_scaling: float = 10.0


class ConsistencyDistillation(Objective):
    name = "consistency"
    Config = ConsistencyConfig
    rule = "renoise"
    needs_data = True

    def __init__(self, teacher: BaseDenoiser, student: BaseDenoiser, config: ConsistencyConfig, num_steps: int = 1,
                 timesteps: list[float] | None = None, max_steps: int | None = None, factory=None):
        self._check(config, teacher)
        super().__init__(teacher, student, config, num_steps, timesteps, max_steps, factory)
        self.boundary = {"sigma_data": config.sigma_data, "timestep_scaling": config.timestep_scaling}
        self.online = BoundaryDenoiser(student, **self.boundary)
        self.target = None
        if config.target_ema is not None:
            plain = copy.deepcopy(unwrap_denoiser(student)).requires_grad_(False).eval()
            self.target = BoundaryDenoiser(plain, **self.boundary)

    @staticmethod
    def _check(config: ConsistencyConfig, teacher: BaseDenoiser) -> None:
        if config.solver not in ("ddim", "heun"):
            raise UsageError(f"objective.solver is {config.solver!r}; expected 'ddim' or 'heun'")
        if config.distance not in ("l2", "huber"):
            raise UsageError(f"objective.distance is {config.distance!r}; expected 'l2' or 'huber'")
        if config.target_ema is not None and not 0.0 <= config.target_ema < 1.0:
            raise UsageError(f"objective.target_ema is {config.target_ema}; expected a rate in [0, 1) or null")
        if not 1.0 <= config.guidance_min <= config.guidance_max:
            raise UsageError(f"objective.guidance_min/max are {config.guidance_min}/{config.guidance_max}; "
                             "expected 1 <= guidance_min <= guidance_max")
        T = teacher.schedule.num_train_timesteps
        if teacher.schedule.family != "vp" or not 1 <= config.skip < T:
            raise UsageError(f"consistency distillation needs a discrete VP teacher and 1 <= objective.skip < {T}; "
                             f"got family {teacher.schedule.family!r}, skip {config.skip}")

    @property
    def grid(self) -> torch.Tensor:
        """``t_n = (n + 1) k - 1``: LCM's DDIM skip grid ([19, 39, ..., 999] for k = 20, T = 1000)."""
        T = self.schedule.num_train_timesteps
        return torch.arange(1, T // self.config.skip + 1, dtype=torch.float32) * self.config.skip - 1

    def default_timesteps(self, num_steps):
        """LCMScheduler's choice: every ``len(grid) // n``-th grid point from the top (e.g. 999, 759, 519, 279)."""
        grid = self.grid.flip(0)
        if num_steps > len(grid):
            raise UsageError(f"student.num_steps is {num_steps}, but the consistency grid (objective.skip = "
                             f"{self.config.skip}) has {len(grid)} points; expected at most {len(grid)} steps, or a "
                             "smaller objective.skip")
        stride = max(len(grid) // num_steps, 1)
        return grid[::stride][:num_steps].tolist()

    def loss(self, phase, batch, step):
        x0 = batch.x0
        b = x0.shape[0]
        grid = self.grid.to(x0.device)
        t = grid[torch.randint(0, len(grid), (b,), device=x0.device)]
        s = (t - self.config.skip).clamp(min=0)
        x_t = self.schedule.add_noise(x0, torch.randn_like(x0), t)
        with torch.no_grad():
            x_s = self._teacher_step(x_t, t, s, batch)
            target_net = self.target if self.target is not None else self.online
            target = target_net(x_s, s, batch.cond)
        pred = self.online(x_t, t, batch.cond)
        diff = (pred.float() - target.float()).flatten(1)
        if self.config.distance == "l2":
            per_sample = (diff**2).mean(1)
        else:
            c = self.config.huber_c
            per_sample = ((diff**2 + c**2).sqrt() - c).mean(1)
        return {"loss": per_sample.mean(), "mse": (diff**2).mean().detach()}

    def _teacher_step(self, x_t, t, s, batch):
        cfg = self.config
        guidance = None
        if cfg.guidance_max > 1.0:
            u = torch.rand(x_t.shape[0], device=x_t.device)
            guidance = Guidance(batch.uncond, cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * u)
        x0_t = denoise(self.teacher, x_t, t, batch.cond, guidance)
        x_s = ddim_step(self.schedule, x_t, x0_t, t, s)
        if cfg.solver == "heun":
            x0_s = denoise(self.teacher, x_s, s, batch.cond, guidance)
            x_s = ddim_step(self.schedule, x_t, (x0_t + x0_s) / 2, t, s)
        return x_s

    @torch.no_grad()
    def on_step_end(self, step: int) -> None:
        if self.target is None:
            return
        online = [p.detach() for p in unwrap_denoiser(self.student).parameters()]
        target = list(self.target.inner.parameters())
        torch._foreach_lerp_(target, online, 1.0 - self.config.target_ema)

    def state_dict(self):
        return {} if self.target is None else {"target": self.target.inner.state_dict()}

    def load_state_dict(self, state):
        if self.target is not None and "target" in state:
            self.target.inner.load_state_dict(state["target"])

    def sampling_denoiser(self):
        return self.online

    def export_config(self):
        """A consistency function is trained on the whole grid, so it serves any step count: export the
        LCM-style timesteps for 1, 2, 4 and 8 steps besides the trained ``num_steps``."""
        config = super().export_config()
        for n in (1, 2, 4, 8):
            config["trained_timesteps"].setdefault(str(n), self.default_timesteps(n))
        return {**config, "boundary": dict(self.boundary)}

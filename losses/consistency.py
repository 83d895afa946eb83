"""Consistency distillation (Song et al. 2023, "Consistency models", Algorithm 2) in the latent
consistency form (Luo et al. 2023, "Latent consistency models", Algorithm 1), on any noise schedule.

The student is boundary-conditioned, ``f(x, t) = c_skip(t) x + c_out(t) x0_G(x, t)`` with
``c_skip = 1, c_out = 0`` at the schedule's clean end ``t_0 = schedule.t_min``
(``fastgen.denoiser.boundary_coefficients``: LCM's form shifted to ``t_min``, ``0`` for VP and flow,
``sigma_min`` for EDM as in Song et al. 2023, Appendix C). Training runs on a grid
``t_0 < t_1 < ... < t_N`` of the teacher's native time (``ConsistencyDistillation.grid``), always asked
of the schedule:

- ``skip = k`` (default 20): every k-th point, counted from the clean end, of the teacher's own
  ``T``-point sampling grid ``schedule.timesteps(T)`` (``T = num_train_timesteps``). VP: LCM's DDIM skip
  grid ``t_n = n k - 1`` ([19, 39, ..., 999] for T = 1000, 50 points); flow: every k-th point of the
  1000-step shifted Euler grid of ``FlowMatchEulerDiscreteScheduler`` (``t = 1000 sigma``, sigma after the
  shift), from ``t ≈ 60`` to ``1000`` for shift 3; EDM: every k-th of 1000 Karras sigmas.
- ``grid_points = N`` instead: the teacher's own N-point sampling grid ``schedule.timesteps(N)``. EDM:
  the Karras grid ``sigma_min = t_1 < ... < t_N = sigma_max`` with the schedule's ``rho`` (7), Song et al.'s
  CD discretisation (openai/consistency_models: N = 18 for CIFAR-10, 40 for ImageNet-64); flow: the
  N-step shifted Euler grid; VP: trailing spacing (equal to ``skip = T / N`` when N divides T).

``t_0 = t_min`` is put below the grid unless the grid already ends there (EDM's Karras grid). A pair
``t = t_n > s = t_{n-1}`` (n ≥ 1) is drawn uniformly; ``x_t = alpha_t x + sigma_t eps`` from data; one
teacher ODE step (DDIM = Euler for flow and EDM in x0 form, or Heun) from ``x_t`` gives ``x_s``, with
classifier-free guidance drawn per sample from a range for text teachers; the loss is
``d(f_G(x_t, t), sg f_target(x_s, s))`` with ``d`` L2 or pseudo-Huber ``sqrt(|a - b|² + c²) - c``
(Song & Dhariwal 2023, eq. 4), and the target network an EMA of the student (rate 0.95), or the online
student without gradient (``target_ema: null``, LCM-LoRA). At ``s = t_0`` the target is ``x_s`` itself
(the boundary). Multistep sampling predicts ``f`` and renoises; the student's timesteps are grid points
(LCMScheduler's choice, ``default_timesteps``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgen.denoiser import BoundaryDenoiser
from fastgen.errors import UsageError, check_fields
from fastgen.losses.base import Objective, Phase
from fastgen.samplers.solvers import Guidance, ddim_step, denoise


@dataclass
class ConsistencyConfig:
    skip: int = 20                     # k: every k-th point of schedule.timesteps(T) (LCM: 20 → 50 points)
    grid_points: int | None = None     # N: schedule.timesteps(N) instead (EDM, Song et al.: 18 or 40 Karras points)
    solver: str = "ddim"               # teacher ODE step: "ddim" or "heun"
    distance: str = "huber"            # "l2" or "huber" (pseudo-Huber)
    huber_c: float = 0.001             # pseudo-Huber c (LCM)
    target_ema: float | None = 0.95    # EMA rate of the target network; None = online student without grad
    guidance_min: float = 1.0          # Ho–Salimans CFG scale range of the teacher step (LCM: w in [5, 15]
    guidance_max: float = 1.0          # in c + w (c - u), i.e. scale in [6, 16]); 1 = no guidance
    sigma_data: float = 0.5            # boundary condition c_skip, c_out (LCM), u = timestep_scaling (t - t_min)
    timestep_scaling: float = 10.0     # LCM: 10 on VP/flow native time; EDM, Song et al.'s c_skip: 1

    def __post_init__(self):
        check_fields([
            (self.solver in ("ddim", "heun"), "solver", self.solver, "'ddim' or 'heun'"),
            (self.distance in ("l2", "huber"), "distance", self.distance, "'l2' or 'huber'"),
            (self.target_ema is None or 0.0 <= self.target_ema < 1.0, "target_ema", self.target_ema,
             "a rate in [0, 1) or null"),
            (1.0 <= self.guidance_min <= self.guidance_max, "guidance_min/max", (self.guidance_min,
             self.guidance_max), "1 <= guidance_min <= guidance_max"),
            (self.skip >= 1, "skip", self.skip, ">= 1 (every skip-th of the teacher's grid points)"),
            (self.grid_points is None or self.grid_points >= 1, "grid_points", self.grid_points,
             "a number of points >= 1 or null (use objective.skip)"),
        ], "objective.")


class ConsistencyDistillation(Objective):
    name = "consistency"
    Config = ConsistencyConfig
    rule = "renoise"
    needs_data = True

    def __init__(self, teacher, nets, config: ConsistencyConfig, plan, max_steps=None, factory=None):
        super().__init__(teacher, nets, config, plan, max_steps, factory)
        if not 1 <= config.skip < self.schedule.num_train_timesteps:
            raise UsageError(f"objective.skip is {config.skip}; expected 1 <= skip < "
                             f"{self.schedule.num_train_timesteps} (every skip-th of the teacher's "
                             "num_train_timesteps grid points)")
        self.boundary = self.boundary_condition(config)
        self.target = None
        if config.target_ema is not None:
            self.target = BoundaryDenoiser(self.factory.frozen(self.student), **self.boundary)

    @property
    def online(self) -> BoundaryDenoiser:
        """The student in its boundary form (over ``nets["student"]``, wrapped or not)."""
        return BoundaryDenoiser(self.student, **self.boundary)

    @staticmethod
    def grid(schedule, config: ConsistencyConfig) -> torch.Tensor:
        """The ascending grid ``t_0 = t_min < t_1 < ... < t_N`` in the teacher's native time: every
        ``skip``-th point of ``schedule.timesteps(T)`` from the clean end, or ``schedule.timesteps(grid_points)``
        (e.g. VP, k = 20: [0, 19, 39, ..., 999]; EDM, N = 18: the Karras sigmas from 0.002 to 80)."""
        if config.grid_points is None:
            points = schedule.timesteps(schedule.num_train_timesteps).flip(0)[config.skip - 1::config.skip]
        else:
            try:
                points = schedule.timesteps(config.grid_points).flip(0)
            except ValueError as err:
                raise UsageError(f"objective.grid_points is {config.grid_points}: {err}") from None
        t_min = torch.tensor([schedule.t_min])
        if torch.isclose(points[0], t_min[0]):  # the grid already ends at the boundary (EDM's Karras grid)
            points = points[1:]
        grid = torch.cat([t_min, points.float()])
        if len(grid) < 2 or not bool((grid[1:] > grid[:-1]).all()):
            raise UsageError(f"objective.skip = {config.skip}, grid_points = {config.grid_points}: the teacher's grid "
                             f"{points.tolist()} is not strictly increasing above t_min = {schedule.t_min}; "
                             "expected distinct points above the clean end")
        return grid

    @classmethod
    def default_grid(cls, schedule, student_schedule, config, num_steps):
        """LCMScheduler's choice: every ``N // n``-th grid point from the top (e.g. 999, 759, 519, 279)."""
        points = cls.grid(schedule, config)[1:].flip(0)
        if num_steps > len(points):
            raise UsageError(f"student.num_steps is {num_steps}, but the consistency grid (objective.skip = "
                             f"{config.skip}, grid_points = {config.grid_points}) has {len(points)} points; "
                             f"expected at most {len(points)} steps, or a smaller objective.skip")
        stride = max(len(points) // num_steps, 1)
        return points[::stride][:num_steps].tolist()

    @classmethod
    def plan_grids(cls, schedule, student_schedule, config, num_steps):
        """A consistency function is trained on the whole grid, so it serves any step count: the LCM-style
        timesteps for 1, 2, 4 and 8 steps (as many as the grid holds) besides the trained ``num_steps``."""
        size = len(cls.grid(schedule, config))
        counts = {num_steps} | {n for n in (1, 2, 4, 8) if n < size}
        return {n: cls.default_grid(schedule, student_schedule, config, n) for n in sorted(counts)}

    @classmethod
    def exported_counts(cls, config, num_steps, grids):
        return sorted(grids)

    @classmethod
    def boundary_condition(cls, config):
        return {"sigma_data": config.sigma_data, "timestep_scaling": config.timestep_scaling}

    def phases(self):
        return [Phase("generator", ("student",), self.consistency_loss)]

    def consistency_loss(self, batch, step):
        """The consistency loss between adjacent grid points (module docstring)."""
        x0 = batch.x0
        b = x0.shape[0]
        grid = self.grid(self.schedule, self.config).to(x0.device)
        n = torch.randint(0, len(grid) - 1, (b,), device=x0.device) + 1
        t, s = grid[n], grid[n - 1]
        x_t = self.schedule.add_noise(x0, torch.randn_like(x0), t)
        online = self.online
        with torch.no_grad():
            x_s = self._teacher_step(x_t, t, s, batch)
            target = (self.target if self.target is not None else online)(x_s, s, batch.cond)
        pred = online(x_t, t, batch.cond)
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
        online = [p.detach() for p in self.student.parameters()]
        target = list(self.target.inner.parameters())
        torch._foreach_lerp_(target, online, 1.0 - self.config.target_ema)

    def state_dict(self):
        return {} if self.target is None else {"target": self.target.inner.state_dict()}

    def load_state_dict(self, state):
        if self.target is not None and "target" in state:
            self.target.inner.load_state_dict(state["target"])

    def sampling_denoiser(self):
        return self.online

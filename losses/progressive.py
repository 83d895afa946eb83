"""Progressive distillation (Salimans & Ho 2022, "Progressive distillation for fast sampling of diffusion
models", Algorithm 2).

The student of ``N/2`` steps learns to match two deterministic DDIM steps of the teacher of ``N`` steps.
From ``z_t = alpha_t x + sigma_t eps`` the teacher steps ``t -> t' -> t''``; the target ``x~`` is the x0
that a single DDIM step ``t -> t''`` needs to land on ``z_t''`` (eq. 8):

    x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)

and the loss is ``max(SNR_t, 1) ||x0_G(z_t) - x~||²`` ("truncated SNR" weighting, §4). When the
student has converged it becomes the teacher and ``N`` halves (``start_steps -> ... -> num_steps``).
Grids are the schedule's own ``schedule.timesteps(N)`` (VP: trailing; flow: the shifted Euler grid of
``FlowMatchEulerDiscreteScheduler``; EDM: Karras sigmas), and the ``N/2`` grid is every other point of the
``N`` grid. A pair ending on the clean sample has the teacher's x0 at its midpoint as target.

Every family: the DDIM step is the Euler step of flow (``alpha = 1 - sigma``) and EDM (``alpha = 1``) in x0
form, eq. 8 only needs ``sigma_t > 0`` and distinct SNRs at ``t`` and ``t''`` (its denominator is
``(alpha_t'' sigma_t - sigma_t'' alpha_t) / sigma_t``), which every grid point has, including flow's
``t = T`` where ``alpha = 0``; ``SNR = alpha² / sigma²`` (EDM: ``1 / sigma²``) is 0 there, so the weight is 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastgen.errors import UsageError
from fastgen.losses.base import Objective, Phase
from fastgen.samplers.solvers import Guidance, alpha_sigma, ddim_step, denoise


@dataclass
class ProgressiveConfig:
    start_steps: int = 64         # the teacher's steps in the first round; the student starts at half
    steps_per_round: int = 0      # training steps per halving; 0 = train.max_steps split evenly over the rounds
    guidance_scale: float = 1.0   # Ho–Salimans CFG scale of the first-round teacher (1 = none)


def progressive_target(schedule, z_t, z_s, t, s) -> torch.Tensor:
    """The x0 whose single DDIM step from ``(z_t, t)`` lands on ``z_s`` at ``s`` (``None``: clean)."""
    a_t, s_t = alpha_sigma(schedule, t, z_t)
    a_s, s_s = alpha_sigma(schedule, s, z_t)
    ratio = s_s / s_t
    return (z_s - ratio * z_t) / (a_s - ratio * a_t)


class ProgressiveDistillation(Objective):
    name = "progressive"
    Config = ProgressiveConfig
    rule = "ddim"
    needs_data = True

    def __init__(self, teacher, nets, config: ProgressiveConfig, plan, max_steps=None, factory=None):
        super().__init__(teacher, nets, config, plan, max_steps, factory)
        num_steps = self.num_steps
        rounds = math.log2(config.start_steps / num_steps) if config.start_steps >= num_steps else -1
        if rounds < 1 or not rounds.is_integer():
            raise UsageError(
                f"objective.start_steps = {config.start_steps} and student.num_steps = {num_steps}: expected "
                "start_steps = num_steps * 2^k for some k >= 1 (e.g. 64 -> 4 is 4 halvings)"
            )
        self.num_rounds = int(rounds)
        per_round = config.steps_per_round or (max_steps or 0) // self.num_rounds
        if per_round < 1:
            raise UsageError(
                f"objective.steps_per_round resolves to {per_round}; give it explicitly or make train.max_steps "
                f">= the {self.num_rounds} rounds"
            )
        self.steps_per_round = per_round
        self.round = 0
        self.round_teacher = self.teacher

    @classmethod
    def default_grid(cls, schedule, student_schedule, config, num_steps: int) -> list[float]:
        """The teacher's own sampling grid ``schedule.timesteps(num_steps)``: the grid every round halves."""
        return schedule.timesteps(num_steps).tolist()

    @property
    def teacher_steps(self) -> int:
        return self.config.start_steps // 2**self.round

    def phases(self):
        return [Phase("generator", ("student",), self.progressive_loss)]

    def progressive_loss(self, batch, step):
        """Regression of one student step on two steps of the current round's teacher (module docstring)."""
        x0 = batch.x0
        n = self.teacher_steps
        grid = self.schedule.timesteps(n).to(x0.device)
        k = torch.randint(0, n // 2, (x0.shape[0],), device=x0.device)
        t, mid = grid[2 * k], grid[2 * k + 1]
        eps = torch.randn_like(x0)
        z_t = self.schedule.add_noise(x0, eps, t)
        last = 2 * k + 2 >= n  # the pair ends on the clean sample
        s = grid[(2 * k + 2).clamp(max=n - 1)]
        guidance = None if self.round > 0 or self.config.guidance_scale == 1.0 else \
            Guidance(batch.uncond, self.config.guidance_scale)
        with torch.no_grad():
            x0_t = denoise(self.round_teacher, z_t, t, batch.cond, guidance)
            z_mid = ddim_step(self.schedule, z_t, x0_t, t, mid)
            x0_mid = denoise(self.round_teacher, z_mid, mid, batch.cond, guidance)
            z_s = ddim_step(self.schedule, z_mid, x0_mid, mid, s)
            # a pair ending on the clean sample has the teacher's x0 at `mid` as its target
            target = torch.where(last.view(-1, *[1] * (x0.ndim - 1)), x0_mid,
                                 progressive_target(self.schedule, z_t, z_s, t, s))
        pred = self.student(z_t, t, batch.cond)
        weight = (self.schedule.logsnr(t).exp()).clamp(min=1.0)
        per_sample = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
        loss = (weight * per_sample).mean()
        return {"loss": loss, "mse": per_sample.mean().detach(), "teacher_steps": torch.tensor(float(n))}

    def on_step_end(self, step: int) -> None:
        if (step + 1) % self.steps_per_round == 0 and self.round < self.num_rounds - 1:
            self._next_round()

    def _next_round(self) -> None:
        """The student becomes the teacher of the next round (a frozen copy of its current weights)."""
        self.round += 1
        frozen = self.factory.frozen(self.student)
        self.round_teacher = frozen

    def state_dict(self):
        state = {"round": self.round}
        if self.round > 0:
            state["round_teacher"] = self.round_teacher.state_dict()
        return state

    def load_state_dict(self, state):
        self.round = 0
        self.round_teacher = self.teacher
        if state.get("round", 0) > 0:
            self.round = state["round"] - 1
            self._next_round()
            self.round_teacher.load_state_dict(state["round_teacher"])


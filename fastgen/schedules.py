"""Noise schedules: one object per family, read from the teacher's own diffusers scheduler config.

Every family writes a noisy sample as ``x_t = alpha(t) x0 + sigma(t) eps`` for the model's native time
``t`` (a float tensor), and every objective in fastgen is written once against ``(alpha, sigma, x0)``:

- ``VPSchedule`` — discrete variance-preserving schedules (DDPM, DDIM, PNDM, Euler, LCM, DPM-Solver…):
  ``alpha = sqrt(alphas_cumprod[t])``, ``sigma = sqrt(1 - alphas_cumprod[t])``, ``t ∈ [0, T-1]``
  (Ho et al. 2020, eq. 4); non-integer ``t`` interpolates ``log alphas_cumprod`` linearly.
- ``FlowSchedule`` — rectified flow (``FlowMatchEulerDiscreteScheduler``): ``x_t = (1 - s) x0 + s eps``
  with ``s = t / T`` (Liu et al. 2023; Esser et al. 2024, eq. 1); the shift only moves the sampling grid.
- ``EDMSchedule`` — variance exploding with Karras preconditioning (``EDMEulerScheduler``):
  ``alpha = 1``, ``sigma = t`` (Karras et al. 2022, Table 1).

Each schedule computes both coefficients in one pass with ``alpha_sigma(t) -> (alpha, sigma)``;
``alpha(t)`` and ``sigma(t)`` are thin wrappers over it, and every method that needs both (``add_noise``,
``transition``, ``to_x0``, ``to_eps``, ``from_x0``, ``logsnr``) calls ``alpha_sigma`` once per time. A table
(VP's ``log alphas_cumprod``) is copied to a device once and cached per ``(device, dtype)`` in the
schedule's ``_tables`` dict (dropped when pickled or deep-copied, rebuilt on first use), so ``alpha_sigma``
on a device tensor copies nothing and never synchronises with the host.

The model's output type (``prediction_type``) is converted with ``to_x0`` / ``to_eps`` / ``from_x0``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from fastgen.errors import UsageError
def _as_tensor(t, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t.float()
    device = like.device if like is not None else None
    return torch.as_tensor(t, dtype=torch.float32, device=device)


def expand_to(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample coefficient of shape () or (B,) against a batch ``x`` of shape (B, ...)."""
    v = v.to(device=x.device, dtype=x.dtype)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of ``fp(xp)`` at ``x`` for increasing ``xp`` (clamped at the ends)."""
    xp, fp = xp.to(x.device), fp.to(x.device)
    idx = torch.searchsorted(xp, x.clamp(xp[0], xp[-1]).contiguous()).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    w = ((x - x0) / (x1 - x0)).clamp(0, 1)
    return f0 + w * (f1 - f0)


class NoiseSchedule:
    """``x_t = alpha(t) x0 + sigma(t) eps`` for one family; subclasses define ``alpha_sigma``."""

    family: str = ""
    supported_predictions: tuple[str, ...] = ()

    def __init__(self, prediction_type: str, t_min: float, t_max: float, num_train_timesteps: int):
        if prediction_type not in self.supported_predictions:
            raise ValueError(
                f"prediction_type {prediction_type!r} is not supported by the {self.family} schedule; "
                f"expected one of {list(self.supported_predictions)}"
            )
        self.prediction_type = prediction_type
        self.t_min = float(t_min)
        self.t_max = float(t_max)
        self.num_train_timesteps = int(num_train_timesteps)
        # (device, dtype) -> this schedule's tables on that device (see ``_device_tables``)
        self._tables: dict[tuple[torch.device, torch.dtype], Any] = {}

    # -- pickling: the per-device cache is not state ------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tables"] = {}
        return state

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_tables", {})

    def _device_tables(self, device: torch.device, dtype: torch.dtype):
        """This schedule's tables on ``(device, dtype)``, built by ``_build_tables`` on first use and
        cached: later calls return the same tensors, so nothing is copied per call."""
        key = (device, dtype)
        tables = self._tables.get(key)
        if tables is None:
            tables = self._tables[key] = self._build_tables(device, dtype)
        return tables

    def _build_tables(self, device: torch.device, dtype: torch.dtype):
        raise NotImplementedError(f"the {self.family} schedule has no tables")

    # -- the schedule -----------------------------------------------------------------------------
    def alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha(t), sigma(t))`` in one pass, each of ``t``'s shape (float32, on ``t``'s device).
        Differentiable in ``t`` (autograd and ``torch.autograd.forward_ad``) and free of host syncs."""
        raise NotImplementedError

    def alpha(self, t) -> torch.Tensor:
        """``alpha(t)``; ``alpha_sigma(t)[0]``."""
        return self.alpha_sigma(t)[0]

    def sigma(self, t) -> torch.Tensor:
        """``sigma(t)``; ``alpha_sigma(t)[1]``."""
        return self.alpha_sigma(t)[1]

    def _alpha_sigma_like(self, t, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``alpha_sigma(t)`` broadcast against a batch ``x`` (shape (B, 1, ..., 1), ``x``'s dtype)."""
        a, s = self.alpha_sigma(t)
        return expand_to(a, x), expand_to(s, x)

    def few_step_grid(self, n: int) -> torch.Tensor:
        """The default times of an ``n``-step student: the teacher's own ``timesteps(n)``, which for VP is the
        trailing grid (``[999, 499]`` for 2 steps)."""
        return self.timesteps(n)

    def logsnr(self, t) -> torch.Tensor:
        """``log(alpha² / sigma²)`` (Kingma et al. 2021, "Variational diffusion models", eq. 2)."""
        a, s = self.alpha_sigma(t)
        return 2 * (torch.log(a) - torch.log(s))

    def t_from_logsnr(self, logsnr) -> torch.Tensor:
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """``x_t = alpha(t) x0 + sigma(t) eps``."""
        a, s = self._alpha_sigma_like(_as_tensor(t, x0), x0)
        return a * x0 + s * eps

    def transition(self, x_s: torch.Tensor, eps: torch.Tensor, s, t) -> torch.Tensor:
        """Diffuse ``x_s`` at level ``s`` to the noisier level ``t``:
        ``x_t = (alpha_t/alpha_s) x_s + sqrt(sigma_t² - (alpha_t/alpha_s)² sigma_s²) eps``."""
        a_s, sig_s = self.alpha_sigma(_as_tensor(s, x_s))
        a_t, sig_t = self.alpha_sigma(_as_tensor(t, x_s))
        ratio = a_t / a_s
        std = (sig_t**2 - ratio**2 * sig_s**2).clamp_min(0).sqrt()
        return expand_to(ratio, x_s) * x_s + expand_to(std, x_s) * eps

    # -- the model's own input and output -----------------------------------------------------------
    def model_input(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the network is called with; identity except for EDM preconditioning."""
        return x_t, t

    def to_x0(self, out: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """The x0-prediction implied by the network output ``out`` at ``(x_t, t)``."""
        t = _as_tensor(t, x_t)
        return self._x0(out, x_t, t, *self._alpha_sigma_like(t, x_t))

    def _x0(self, out, x_t, t, a, s) -> torch.Tensor:
        """``to_x0`` given ``(a, s) = alpha_sigma(t)`` already broadcast against ``x_t``."""
        kind = self.prediction_type
        if kind == "sample":
            return out
        if kind == "epsilon":  # x_t = a x0 + s eps (Ho et al. 2020, eq. 4)
            return (x_t - s * out) / a
        if kind == "v_prediction":  # v = alpha eps - sigma x0 with alpha² + sigma² = 1 (Salimans & Ho 2022)
            return a * x_t - s * out
        if kind == "flow":  # v = eps - x0 with alpha = 1 - sigma
            return x_t - s * out
        raise NotImplementedError(kind)

    def from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """The network output (of this schedule's prediction type) that ``to_x0`` maps to ``x0``."""
        a, s = self._alpha_sigma_like(_as_tensor(t, x_t), x_t)
        kind = self.prediction_type
        if kind == "sample":
            return x0
        if kind == "epsilon":
            return (x_t - a * x0) / s
        if kind == "v_prediction":
            return (a * x_t - x0) / s
        if kind == "flow":
            return (x_t - x0) / s
        raise NotImplementedError(kind)

    def to_eps(self, out: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """The noise implied by the network output: ``eps = (x_t - alpha x0) / sigma``."""
        t = _as_tensor(t, x_t)
        a, s = self._alpha_sigma_like(t, x_t)
        x0 = self._x0(out, x_t, t, a, s)
        return (x_t - a * x0) / s

    # -- time grids ------------------------------------------------------------------------------
    def sample_t(self, n: int, generator=None, device=None, t_min=None, t_max=None) -> torch.Tensor:
        """Training times, uniform on ``[t_min, t_max]`` of the native range (integers for VP)."""
        lo = self.t_min if t_min is None else float(t_min)
        hi = self.t_max if t_max is None else float(t_max)
        if not self.t_min <= lo <= hi <= self.t_max:
            raise ValueError(
                f"sample_t: range [{lo}, {hi}] is not inside the schedule's [{self.t_min}, {self.t_max}]"
            )
        u = torch.rand(n, generator=generator, device=device)
        return lo + (hi - lo) * u

    def timesteps(self, n: int) -> torch.Tensor:
        """The ``n`` descending native times a sampler visits (the last step then goes to x0)."""
        raise NotImplementedError

    def prior_scale(self, t) -> float:
        """Scale of the Gaussian a sampler starting at ``t`` draws: 1 (VP and flow start from a unit
        Gaussian; a student conditioned at ``t < T`` is fed pure noise too)."""
        return 1.0

    def describe(self) -> dict[str, Any]:
        """A JSON-able description from which ``schedule_from_description`` rebuilds this schedule."""
        raise NotImplementedError


class VPSchedule(NoiseSchedule):
    """Discrete variance-preserving schedule from a table of ``alphas_cumprod`` (Ho et al. 2020)."""

    family = "vp"
    supported_predictions = ("epsilon", "v_prediction", "sample")

    def __init__(self, alphas_cumprod, prediction_type: str = "epsilon"):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if ac.ndim != 1 or len(ac) < 2 or not bool(((ac > 0) | (torch.arange(len(ac)) == len(ac) - 1)).all()):
            raise ValueError("alphas_cumprod: expected a 1-D table of at least 2 values in (0, 1]")
        super().__init__(prediction_type, 0.0, len(ac) - 1, len(ac))
        self.alphas_cumprod = ac.float()
        # log ā is decreasing in t; a zero terminal SNR (ā = 0) is kept finite for interpolation.
        # These CPU tables are the masters; ``_device_tables`` holds their copies on each device.
        self._log_ac = torch.log(ac.clamp_min(1e-12)).float()
        self._grid = torch.arange(len(ac), dtype=torch.float32)

    def _build_tables(self, device: torch.device, dtype: torch.dtype):
        """``(log ā[i], log ā[i+1] - log ā[i], log ā reversed, t reversed)`` on ``(device, dtype)``."""
        log_ac = self._log_ac.to(device=device, dtype=dtype, copy=True)
        grid = self._grid.to(device=device, dtype=dtype, copy=True)
        return log_ac, log_ac[1:] - log_ac[:-1], log_ac.flip(0), grid.flip(0)

    def _log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """``log ā(t)``: the table ``log ā[i]`` read at integer ``t`` and interpolated linearly in between,
        ``log ā(t) = log ā[i] + (t - i)(log ā[i+1] - log ā[i])`` with ``i = floor(t)``; ``t`` is clamped
        to ``[0, T-1]``. The grid is ``0, 1, ..., T-1``, so ``i`` is read off ``t`` (no search), and the
        weight ``t - i`` carries the derivative in ``t`` (the right-hand one at a table point; 0 outside and
        at the ends of ``[0, T-1]``)."""
        log_ac, dlog_ac, _, _ = self._device_tables(t.device, t.dtype)
        last = self.num_train_timesteps - 1
        t = t.clamp(0, last)
        i = t.detach().floor().long().clamp_(max=last - 1)
        return log_ac[i] + (t - i) * dlog_ac[i]

    def alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """``alpha = sqrt(ā(t))``, ``sigma = sqrt(1 - ā(t))``, i.e.
        ``q(x_t | x_0) = N(sqrt(ā_t) x_0, (1 - ā_t) I)`` (Ho et al. 2020, eq. 4; the discretised VP SDE of
        Song et al. 2021, "Score-based generative modeling through stochastic differential equations",
        eq. 11), with ``ā(t)`` interpolated geometrically between the table's integer times (see
        ``_log_alpha_bar``). One table read for both."""
        alpha_bar = torch.exp(self._log_alpha_bar(_as_tensor(t)))
        return alpha_bar.sqrt(), (1 - alpha_bar).clamp_min(0).sqrt()

    def t_from_logsnr(self, logsnr) -> torch.Tensor:
        log_ac = torch.nn.functional.logsigmoid(_as_tensor(logsnr))
        # interpolate t(log ā) on the increasing reversed table
        _, _, log_ac_rev, grid_rev = self._device_tables(log_ac.device, log_ac.dtype)
        return _interp(log_ac, log_ac_rev, grid_rev)

    def sample_t(self, n: int, generator=None, device=None, t_min=None, t_max=None) -> torch.Tensor:
        return super().sample_t(n, generator, device, t_min, t_max).round()

    def timesteps(self, n: int) -> torch.Tensor:
        """"Trailing" spacing (Lin et al. 2024, Table 2): ``round(T - k T/n) - 1``, e.g. [999, 749, 499, 249]
        for n = 4, so that even one step starts from the last trained time."""
        T = self.num_train_timesteps
        if not 1 <= n <= T:
            raise UsageError(f"{n} steps: expected 1 to {T} (the teacher's num_train_timesteps)")
        return (torch.round(T - torch.arange(n) * (T / n)) - 1).float()

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "prediction_type": self.prediction_type,
            "alphas_cumprod": [float(v) for v in self.alphas_cumprod],
        }


class FlowSchedule(NoiseSchedule):
    """Rectified flow, ``x_t = (1 - s) x0 + s eps`` with ``s = t / T`` (Esser et al. 2024, eq. 1)."""

    family = "flow"
    supported_predictions = ("flow",)

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, prediction_type: str = "flow"):
        if shift <= 0:
            raise ValueError(f"shift: expected a positive number, got {shift}")
        super().__init__(prediction_type, 0.0, float(num_train_timesteps), num_train_timesteps)
        self.shift = float(shift)

    def alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """``alpha = 1 - s``, ``sigma = s`` with ``s = t / T``: the straight path ``x_t = (1 - s) x0 + s eps``
        of rectified flow (Liu et al. 2023, "Flow straight and fast", eq. 1 with ``X_0`` the noise
        end; Esser et al. 2024, eq. 1). The shift reparametrises the time grid (``shifted``), not this map."""
        s = _as_tensor(t) / self.num_train_timesteps
        return 1 - s, s

    def t_from_logsnr(self, logsnr) -> torch.Tensor:
        return torch.sigmoid(-_as_tensor(logsnr) / 2) * self.num_train_timesteps

    def shifted(self, s: torch.Tensor) -> torch.Tensor:
        """``shift s / (1 + (shift - 1) s)`` (Esser et al. 2024, eq. 23)."""
        return self.shift * s / (1 + (self.shift - 1) * s)

    def sample_t(self, n: int, generator=None, device=None, t_min=None, t_max=None) -> torch.Tensor:
        """Uniform times pushed through the shift, as the teacher was trained."""
        t = super().sample_t(n, generator, device, t_min, t_max)
        return self.shifted(t / self.num_train_timesteps) * self.num_train_timesteps

    def timesteps(self, n: int) -> torch.Tensor:
        """``FlowMatchEulerDiscreteScheduler.set_timesteps``: sigmas linear from 1 to the smallest shifted
        training sigma ``shifted(1/T)``, then shifted."""
        if n < 1:
            raise ValueError(f"timesteps: n = {n}, expected n >= 1")
        T = self.num_train_timesteps
        s_min = float(self.shifted(torch.tensor(1.0 / T)))
        s = torch.linspace(1.0, s_min, n) if n > 1 else torch.ones(1)
        return self.shifted(s) * T

    def few_step_grid(self, n: int) -> torch.Tensor:
        """The trailing grid ``shifted((n - k) / n) T``, ``k = 0 .. n-1`` (VP's trailing spacing in sigma): the
        sampling grid ``timesteps(n)`` runs down to ``shifted(1/T)``, almost clean, which would spend the last
        of a few steps on nothing (2 steps: [1000, 1.6] at shift 1.65; trailing: [1000, 623])."""
        if n < 1:
            raise ValueError(f"few_step_grid: n = {n}, expected n >= 1")
        s = torch.arange(n, 0, -1, dtype=torch.float64) / n
        return self.shifted(s).float() * self.num_train_timesteps

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "prediction_type": self.prediction_type,
            "num_train_timesteps": self.num_train_timesteps,
            "shift": self.shift,
        }


class EDMSchedule(NoiseSchedule):
    """EDM (Karras et al. 2022): ``alpha = 1``, ``sigma = t``, network preconditioned with
    ``c_in = 1/sqrt(sigma² + sigma_data²)``, ``c_noise = log(sigma)/4`` and
    ``D = c_skip x + c_out F`` (Table 1). ``prediction_type`` follows ``EDMEulerScheduler``:
    "epsilon" is ``c_out = sigma sigma_data / sqrt(sigma² + sigma_data²)``, "v_prediction" its negative."""

    family = "edm"
    supported_predictions = ("epsilon", "v_prediction")

    def __init__(self, sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0, prediction_type="epsilon",
                 num_train_timesteps: int = 1000):
        super().__init__(prediction_type, sigma_min, sigma_max, num_train_timesteps)
        self.sigma_data, self.rho = float(sigma_data), float(rho)

    def alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """``alpha = s(t) = 1``, ``sigma = sigma(t) = t`` (Karras et al. 2022, Table 1, "ours" column): the
        variance-exploding form ``x_t = x0 + t eps`` (Song et al. 2021, VE SDE, eq. 9)."""
        t = _as_tensor(t)
        return torch.ones_like(t), t

    def t_from_logsnr(self, logsnr) -> torch.Tensor:
        return torch.exp(-_as_tensor(logsnr) / 2)

    def model_input(self, x_t, t):
        c_in = 1 / (t**2 + self.sigma_data**2).sqrt()
        return x_t * expand_to(c_in, x_t), torch.log(t) / 4

    def _c_skip_out(self, t, x):
        sd2 = self.sigma_data**2
        c_skip = sd2 / (t**2 + sd2)
        c_out = t * self.sigma_data / (t**2 + sd2).sqrt()
        if self.prediction_type == "v_prediction":
            c_out = -c_out
        return expand_to(c_skip, x), expand_to(c_out, x)

    def to_x0(self, out, x_t, t):
        """``D(x; sigma) = c_skip(sigma) x + c_out(sigma) F`` (Karras et al. 2022, eq. 7 and Table 1)."""
        return self._x0(out, x_t, _as_tensor(t, x_t), None, None)

    def _x0(self, out, x_t, t, a, s):
        c_skip, c_out = self._c_skip_out(t, x_t)
        return c_skip * x_t + c_out * out

    def from_x0(self, x0, x_t, t):
        c_skip, c_out = self._c_skip_out(_as_tensor(t, x_t), x_t)
        return (x0 - c_skip * x_t) / c_out

    def prior_scale(self, t) -> float:
        """``sigma(t)``: EDM samples start from ``N(0, sigma_max²)``."""
        return float(self.sigma(torch.as_tensor(t, dtype=torch.float32).reshape(-1)[0]))

    def sample_t(self, n, generator=None, device=None, t_min=None, t_max=None, p_mean=-1.2, p_std=1.2):
        """Log-normal training sigmas, ``ln sigma ~ N(P_mean, P_std²)`` (Karras et al. 2022, Table 1),
        clamped to ``[t_min, t_max]``."""
        z = torch.randn(n, generator=generator, device=device)
        lo = self.t_min if t_min is None else t_min
        hi = self.t_max if t_max is None else t_max
        return torch.exp(p_mean + p_std * z).clamp(lo, hi)

    def timesteps(self, n: int) -> torch.Tensor:
        """Karras et al. 2022, eq. 5: ``(smax^(1/ρ) + i/(n-1) (smin^(1/ρ) - smax^(1/ρ)))^ρ``."""
        if n < 1:
            raise ValueError(f"timesteps: n = {n}, expected n >= 1")
        ramp = torch.linspace(0, 1, n) if n > 1 else torch.zeros(1)
        inv = 1 / self.rho
        return (self.t_max**inv + ramp * (self.t_min**inv - self.t_max**inv)) ** self.rho

    def few_step_grid(self, n: int) -> torch.Tensor:
        """The first ``n`` times of the Karras grid of ``n + 1`` (eq. 5): ``timesteps(n)`` ends at ``sigma_min``,
        where a step denoises nothing (2 steps: [80, 0.002]; this grid: [80, 2.5], VP's trailing spacing)."""
        return self.timesteps(n + 1)[:n]

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "prediction_type": self.prediction_type,
            "sigma_min": self.t_min,
            "sigma_max": self.t_max,
            "sigma_data": self.sigma_data,
            "rho": self.rho,
            "num_train_timesteps": self.num_train_timesteps,
        }


VP_SCHEDULERS = {
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "LCMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler",
    "HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "DEISMultistepScheduler",
    "TCDScheduler", "DDIMParallelScheduler", "DDPMParallelScheduler",
}
FLOW_SCHEDULERS = {"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"}
EDM_SCHEDULERS = {"EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"}


def schedule_from_config(config, class_name: str | None = None) -> NoiseSchedule:
    """Build the schedule of a diffusers scheduler: a scheduler object, or its config (the
    ``scheduler_config.json`` contents; ``class_name`` defaults to the config's ``_class_name``)."""
    import diffusers

    if hasattr(config, "config") and not isinstance(config, Mapping):
        class_name = class_name or type(config).__name__
        config = config.config
    config = dict(config)
    name = class_name or config.get("_class_name")
    if name == "FewStepScheduler":
        return schedule_from_description(config["schedule"])
    if name in VP_SCHEDULERS and (config.get("prediction_type") == "flow_prediction" or config.get("use_flow_sigmas")):
        # the multistep solvers in flow mode (Wan's UniPC, SANA's DPM-Solver++): sigma = shifted(t / T), velocity
        # output, flow_shift the shift (diffusers' use_flow_sigmas)
        if config.get("prediction_type") != "flow_prediction":
            raise ValueError(f"{name} has use_flow_sigmas but prediction_type {config.get('prediction_type')!r}; "
                             "expected 'flow_prediction'")
        return FlowSchedule(config.get("num_train_timesteps", 1000), config.get("flow_shift") or 1.0)
    if name in VP_SCHEDULERS:
        prediction = config.get("prediction_type", "epsilon")
        if prediction not in VPSchedule.supported_predictions:
            raise ValueError(
                f"{name}.prediction_type is {prediction!r}; expected one of {list(VPSchedule.supported_predictions)}"
            )
        scheduler = getattr(diffusers, name).from_config(config)
        return VPSchedule(scheduler.alphas_cumprod, prediction)
    if name in FLOW_SCHEDULERS:
        shift = config.get("shift", 1.0)
        if config.get("use_dynamic_shifting"):
            # resolution-dependent shift exp(mu) (Esser et al. 2024, §5.3.2); the base value when not resolved
            shift = math.exp(config.get("base_shift", 0.5))
        return FlowSchedule(config.get("num_train_timesteps", 1000), shift)
    if name in EDM_SCHEDULERS:
        return EDMSchedule(
            config.get("sigma_min", 0.002), config.get("sigma_max", 80.0), config.get("sigma_data", 0.5),
            config.get("rho", 7.0), config.get("prediction_type", "epsilon"), config.get("num_train_timesteps", 1000),
        )
    if name is None:
        raise ValueError("scheduler config has no `_class_name`; pass class_name= (e.g. 'DDIMScheduler')")
    known = sorted(VP_SCHEDULERS | FLOW_SCHEDULERS | EDM_SCHEDULERS | {"FewStepScheduler"})
    raise ValueError(f"scheduler class {name!r} is not a known noise-schedule family; expected one of {known}")


def schedule_from_description(desc: Mapping[str, Any]) -> NoiseSchedule:
    """Inverse of ``NoiseSchedule.describe``."""
    desc = dict(desc)
    family = desc.pop("family", None)
    if family == "vp":
        return VPSchedule(desc["alphas_cumprod"], desc["prediction_type"])
    if family == "flow":
        return FlowSchedule(desc["num_train_timesteps"], desc["shift"], desc["prediction_type"])
    if family == "edm":
        return EDMSchedule(desc["sigma_min"], desc["sigma_max"], desc["sigma_data"], desc["rho"],
                           desc["prediction_type"], desc["num_train_timesteps"])
    raise ValueError(f"schedule.family is {family!r}; expected 'vp', 'flow' or 'edm'")

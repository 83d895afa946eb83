"""Objectives used by the engine tests (in-process and under ``accelerate launch``): several networks, a head
on an intermediate feature of a critic, a LoRA fake score on the teacher's own weights, a student of experts.
``register()`` adds them to ``fastgen.losses.OBJECTIVES``.

They follow the objective contract (``fastgen.losses.base``): networks are added to the trainer's mapping with
``add_network`` and read back from ``self.nets`` on every call (the trainer replaces an entry by its DDP
wrapper), and each phase carries its own loss ``loss(batch, step)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastgen.denoiser import unwrap
from fastgen.losses import OBJECTIVES, Objective, Phase


@dataclass
class ProbeConfig:
    lora_rank: int = 0
    """0: the fake score is a full copy of the teacher; > 0: a LoRA adapter of this rank on its weights."""


class FeatureHeadProbe(Objective):
    """A critic (two convolutions) and a head on the critic's *first* activation, trained every step; the
    student every 2nd step through head and critic. In the generator phase only the critic's first layer
    takes part, the case in which DDP raises its unused-parameter error unless the excluded networks are
    kept out of gradient synchronisation.

    The activation is caught by a forward hook on the first layer of the network behind ``nets["critic"]``,
    registered for the one call: the critic is called through its entry in ``nets`` (under DDP the wrapper,
    whose forward runs that same layer), never through a reference kept from before the trainer wrapped it."""

    name = "feature_head_probe"
    Config = ProbeConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        torch.manual_seed(0)
        channels = self.teacher.sample_shape[0]
        self.add_network("critic", self.factory.module(nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, channels, 3, padding=1))))
        h, w = self.teacher.sample_shape[1:]
        self.add_network("head", self.factory.module(nn.Sequential(nn.Conv2d(8, 1, 1), nn.Flatten(),
                                                                   nn.Linear(h * w, 1))))

    def phases(self):
        return [Phase("critic", ("critic", "head"), self.critic_loss),
                Phase("generator", ("student",), self.generator_loss, every=2)]

    def _critic(self, x):
        """The critic's output on ``x`` and its first activation (after the SiLU)."""
        critic = self.nets["critic"]
        features = {}
        hook = unwrap(critic)[1].register_forward_hook(lambda module, args, out: features.__setitem__("mid", out))
        try:
            out = critic(x)
        finally:
            hook.remove()
        return out, features["mid"]

    def _generate(self, n):
        z = torch.randn(n, *self.teacher.sample_shape)
        return self.student(z, torch.full((n,), float(self.timesteps[0])))

    def critic_loss(self, batch, step):
        with torch.no_grad():
            fake = self._generate(4)
        out, mid = self._critic(fake)
        return {"loss": out.square().mean() + self.nets["head"](mid).square().mean()}

    def generator_loss(self, batch, step):
        _, mid = self._critic(self._generate(4))
        return {"loss": (self.nets["head"](mid) - 1).square().mean()}


class LoraFakeProbe(Objective):
    """A fake score on the teacher's weights (a LoRA adapter, or a full copy) regressed on the teacher's own
    prediction plus an offset, and the student pulled toward the fake score through its input."""

    name = "lora_fake_probe"
    Config = ProbeConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        rank = self.config.lora_rank
        self.add_network("fake", self.factory.lora("fake", rank) if rank else self.factory.copy())

    def phases(self):
        return [Phase("fake", ("fake",), self.fake_loss), Phase("generator", ("student",), self.generator_loss)]

    @staticmethod
    def _inputs(teacher):
        n = 4
        return torch.full((n,), 500.0), torch.randn(n, *teacher.sample_shape)

    def fake_loss(self, batch, step):
        t, z = self._inputs(self.teacher)
        c = batch.cond  # the null condition of a text teacher (data-free), None for a pixel one
        with torch.no_grad():
            target = self.teacher(z, t, c) + 0.5
        return {"loss": (self.nets["fake"](z, t, c) - target).square().mean()}

    def generator_loss(self, batch, step):
        t, z = self._inputs(self.teacher)
        c = batch.cond
        x = self.student(z, torch.full((len(t),), float(self.timesteps[0])), c)
        return {"loss": (self.nets["fake"](x, t, c) - self.teacher(x, t, c)).square().mean()}


class ExpertsProbe(Objective):
    """Regression of every expert of a student of experts on a map of its input, at times of every interval."""

    name = "experts_probe"
    Config = ProbeConfig

    def phases(self):
        return [Phase("generator", ("student",), self.regression_loss)]

    def regression_loss(self, batch, step):
        t = torch.tensor([900.0, 700.0, 300.0, 100.0])
        x_t = torch.randn(4, *self.teacher.sample_shape)
        return {"loss": (self.student(x_t, t) - 0.5 * x_t).square().mean()}


def register():
    for cls in (FeatureHeadProbe, LoraFakeProbe, ExpertsProbe):
        OBJECTIVES[cls.name] = cls

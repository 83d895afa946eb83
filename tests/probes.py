"""Objectives used by the engine tests (in-process and under ``accelerate launch``): several networks, a head
on an intermediate feature of a critic, a LoRA fake score on the teacher's own weights, a student of experts.
``register()`` adds them to ``fastgen.losses.OBJECTIVES``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastgen.losses import OBJECTIVES, Objective, Phase


@dataclass
class ProbeConfig:
    lora_rank: int = 0
    """0: the fake score is a full copy of the teacher; > 0: a LoRA adapter of this rank on its weights."""


class FeatureHeadProbe(Objective):
    """A critic (two convolutions) and a head on the critic's *first* activation, trained every step; the
    student every 2nd step through head and critic. In the generator phase only the critic's first layer
    takes part, the case in which DDP raises its unused-parameter error unless the excluded networks are
    kept out of gradient synchronisation."""

    name = "feature_head_probe"
    Config = ProbeConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        torch.manual_seed(0)
        channels = self.teacher.sample_shape[0]
        self.critic = self.factory.module(nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.SiLU(),
                                                        nn.Conv2d(8, channels, 3, padding=1)))
        h, w = self.teacher.sample_shape[1:]
        self.head = self.factory.module(nn.Sequential(nn.Conv2d(8, 1, 1), nn.Flatten(), nn.Linear(h * w, 1)))
        self.features = {}
        self.critic[1].register_forward_hook(lambda module, args, out: self.features.__setitem__("mid", out))

    def networks(self):
        return {"critic": self.critic, "head": self.head}

    def phases(self):
        return [Phase("critic", ("critic", "head")), Phase("generator", ("student",), every=2)]

    def _generate(self, n):
        z = torch.randn(n, *self.teacher.sample_shape)
        return self.student(z, torch.full((n,), float(self.timesteps[0])))

    def loss(self, phase, batch, step):
        if phase == "critic":
            with torch.no_grad():
                fake = self._generate(4)
            out = self.critic(fake)
            return {"loss": out.square().mean() + self.head(self.features["mid"]).square().mean()}
        x = self._generate(4)
        self.critic(x)
        return {"loss": (self.head(self.features["mid"]) - 1).square().mean()}


class LoraFakeProbe(Objective):
    """A fake score on the teacher's weights (a LoRA adapter, or a full copy) regressed on the teacher's own
    prediction plus an offset, and the student pulled toward the fake score through its input."""

    name = "lora_fake_probe"
    Config = ProbeConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        rank = self.config.lora_rank
        self.fake = self.factory.lora("fake", rank) if rank else self.factory.copy()

    def networks(self):
        return {"fake": self.fake}

    def phases(self):
        return [Phase("fake", ("fake",)), Phase("generator", ("student",))]

    def loss(self, phase, batch, step):
        n = 4
        t = torch.full((n,), 500.0)
        z = torch.randn(n, *self.teacher.sample_shape)
        c = batch.cond  # the null condition of a text teacher (data-free), None for a pixel one
        if phase == "fake":
            with torch.no_grad():
                target = self.teacher(z, t, c) + 0.5
            return {"loss": (self.fake(z, t, c) - target).square().mean()}
        x = self.student(z, torch.full((n,), float(self.timesteps[0])), c)
        return {"loss": (self.fake(x, t, c) - self.teacher(x, t, c)).square().mean()}


class ExpertsProbe(Objective):
    """Regression of every expert of a student of experts on a map of its input, at times of every interval."""

    name = "experts_probe"
    Config = ProbeConfig

    def loss(self, phase, batch, step):
        t = torch.tensor([900.0, 700.0, 300.0, 100.0])
        x_t = torch.randn(4, *self.teacher.sample_shape)
        return {"loss": (self.student(x_t, t) - 0.5 * x_t).square().mean()}


def register():
    for cls in (FeatureHeadProbe, LoraFakeProbe, ExpertsProbe):
        OBJECTIVES[cls.name] = cls

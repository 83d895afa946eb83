"""``TimestepExperts``: a student of K experts (``fastgen.experts.ExpertsDenoiser``) as one diffusers model.

An export puts it in the teacher's denoiser slot (``unet`` or ``transformer``), so the teacher's own pipeline runs
the student unchanged: each call goes to the expert of its timestep. Its config records the experts' diffusers
class and config and the K-1 boundaries in the units of the ``timestep`` the pipeline passes to the network (the
scheduler's ``timesteps``: the native time for VP and flow schedules, EDM's ``c_noise = log(sigma) / 4``);
its weights are the experts' under ``experts.{k}.``. To the pipeline it looks like the teacher's network: its
``config`` holds the experts' keys (``in_channels``, ``sample_size``, ``time_cond_proj_dim``, ...), attributes it
lacks (``add_embedding``) are the first expert's, and ``forward`` takes the network's arguments and returns its
output type. Where diffusers has its own precedent (Wan 2.2's ``transformer`` + ``transformer_2`` with
``boundary_ratio``) that layout would be the export's; none of fastgen's supported families has one.

An export ships this module as ``{unet,transformer}/modeling_experts.py`` (``fastgen.pipelines.remote_code``), for
loaders without fastgen (``trust_remote_code=True``): so it imports only torch and diffusers.
"""

from __future__ import annotations

import dataclasses
import inspect

import diffusers
import torch
from diffusers.configuration_utils import ConfigMixin, FrozenDict, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from fastgen.denoiser import slice_cond
from fastgen.experts import expert_index


class TimestepExperts(ModelMixin, ConfigMixin):
    """K diffusers networks of one class and config; expert ``k`` answers every sample whose timestep ``u``
    has ``b_k < u <= b_{k-1}`` (high noise first, as ``ExpertsDenoiser``).

    Args:
        expert_class: the experts' diffusers model class, e.g. ``"UNet2DConditionModel"``.
        expert_config: their config (``model.config`` without private keys).
        timestep_boundaries: K-1 strictly decreasing boundaries in the units of ``forward``'s ``timestep``.
    """

    @register_to_config
    def __init__(self, expert_class: str, expert_config: dict, timestep_boundaries: list[float]):
        super().__init__()
        cls = getattr(diffusers, expert_class, None)
        if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
            raise ValueError(f"TimestepExperts.expert_class is {expert_class!r}; expected a diffusers model class")
        bounds = [float(b) for b in timestep_boundaries]
        if not bounds or any(a <= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"TimestepExperts.timestep_boundaries is {timestep_boundaries}; expected at least one "
                             "boundary, strictly decreasing (high noise first)")
        self.experts = nn.ModuleList(cls.from_config(expert_config) for _ in range(len(bounds) + 1))
        params = inspect.signature(cls.forward).parameters
        self.input_name = "sample" if "sample" in params else "hidden_states"

    @property
    def config(self) -> FrozenDict:
        """The experts' config keys, then this model's own (what ``save_pretrained`` writes is its own only)."""
        own = self._internal_dict
        mirrored = {k: v for k, v in own["expert_config"].items() if not k.startswith("_")}
        return FrozenDict({**mirrored, **own})

    def __getattr__(self, name: str):
        """An attribute this model lacks is the first expert's (e.g. SDXL's ``add_embedding``), except methods,
        which would act on one expert only."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            experts = self.__dict__.get("_modules", {}).get("experts")
            if name.startswith("_") or experts is None:
                raise
            value = getattr(experts[0], name)
            if inspect.ismethod(value):
                raise AttributeError(f"TimestepExperts has no method {name!r}; call it on each of `.experts`") from None
            return value

    def forward(self, sample: torch.Tensor | None = None, timestep=None, *args, hidden_states: torch.Tensor | None = None,
                return_dict: bool = True, **kwargs):
        """The experts' own call, each sample through the expert of its ``timestep`` (a number, or one per
        sample). The sample comes as ``sample`` (UNets) or ``hidden_states`` (transformers); further positional
        arguments are passed on to UNets, which take them after the timestep."""
        x = sample if sample is not None else hidden_states
        if x is None or timestep is None:
            raise TypeError("TimestepExperts.forward needs the sample (`sample` or `hidden_states`) and `timestep`")
        if args and self.input_name != "sample":
            raise TypeError(f"TimestepExperts of {self.config.expert_class}: pass the arguments after "
                            "`hidden_states` by keyword")
        times = torch.as_tensor(timestep, device=x.device).float().reshape(-1).expand(x.shape[0])
        index = expert_index(times, self.config.timestep_boundaries)
        used = index.unique().tolist()
        if len(used) == 1:
            return self._call(used[0], x, timestep, args, kwargs, return_dict)
        out, first = None, None
        for k in used:
            rows = (index == k).nonzero().flatten()
            sliced_args = [a[rows] if isinstance(a, torch.Tensor) else a for a in args]
            y = self._call(k, x[rows], timestep[rows], sliced_args, slice_cond(kwargs, rows), return_dict)
            first = y if first is None else first
            out = torch.zeros((x.shape[0], *y[0].shape[1:]), dtype=y[0].dtype, device=y[0].device) if out is None else out
            out = out.index_copy(0, rows, y[0])
        if not return_dict:
            return (out,)
        return dataclasses.replace(first, **{dataclasses.fields(first)[0].name: out})

    def _call(self, k: int, x: torch.Tensor, timestep, args, kwargs, return_dict: bool):
        expert = self.experts[k]
        if self.input_name == "sample":
            return expert(x, timestep, *args, return_dict=return_dict, **kwargs)
        return expert(hidden_states=x, timestep=timestep, return_dict=return_dict, **kwargs)

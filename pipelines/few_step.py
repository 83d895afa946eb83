"""``FewStepPipeline``: the diffusers pipeline of an exported pixel-space student (``UNet2DModel``).

Stock ``DDPMPipeline`` runs a ``FewStepScheduler`` too, but it takes no class labels, no initial
``latents`` and no step callback; this pipeline follows the usual diffusers ``__call__`` conventions
for all of them, and applies a scheduler's input scaling (``init_noise_sigma``, ``scale_model_input``: EDM's
preconditioning), which ``DDPMPipeline`` does not. An export ships it as ``pipeline_few_step.py``
(``fastgen.pipelines.remote_code``), so this module imports only torch and diffusers.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

OUTPUT_TYPES = ("pil", "np", "pt")


class FewStepPipeline(DiffusionPipeline):
    """Sample a pixel-space few-step student: start from noise, then one network call and one
    ``scheduler.step`` per trained timestep.

    Args:
        unet: the student network (``UNet2DModel``, unconditional or class-conditional).
        scheduler: a ``fastgen.FewStepScheduler`` holding the trained timesteps (any diffusers scheduler works).
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def _class_labels(self, class_labels, batch_size: int, device) -> torch.Tensor | None:
        """Class labels as a ``(batch_size,)`` long tensor (one label is repeated), checked against the UNet."""
        num_classes = self.unet.config.num_class_embeds
        if class_labels is None:
            if num_classes:
                raise ValueError(f"this UNet is class-conditional ({num_classes} classes): pass class_labels")
            return None
        if not num_classes:
            raise ValueError("class_labels were given but this UNet is unconditional (num_class_embeds is unset)")
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
        if len(labels) == 1:
            labels = labels.expand(batch_size)
        if len(labels) != batch_size:
            raise ValueError(f"{len(labels)} class_labels for batch_size={batch_size}; expected 1 or {batch_size}")
        if bool(((labels < 0) | (labels >= num_classes)).any()):
            raise ValueError(f"class_labels {labels.tolist()} out of range; expected 0..{num_classes - 1}")
        return labels

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        class_labels: int | list[int] | torch.Tensor | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ) -> ImagePipelineOutput | tuple:
        """Generate ``batch_size`` images with ``num_inference_steps`` student steps.

        Args:
            batch_size: number of images.
            num_inference_steps: a step count the student was trained for (see ``scheduler.step_counts``).
            generator: ``torch.Generator`` (or one per image) for the initial noise and the renoising steps.
            latents: initial noise of shape ``(batch_size, C, H, W)``; drawn from ``generator`` when ``None``.
            output_type: ``"pil"``, ``"np"`` (``(B, H, W, C)`` in [0, 1]) or ``"pt"`` (``(B, C, H, W)`` in [0, 1]).
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
            class_labels: one label or one per image, for a class-conditional UNet.
            callback_on_step_end: ``fn(pipe, i, t, callback_kwargs) -> dict`` called after each step; the
                tensors it returns (e.g. ``latents``) replace the pipeline's.
            callback_on_step_end_tensor_inputs: names of the tensors passed in ``callback_kwargs``.

        Returns:
            ``ImagePipelineOutput`` with ``images``, or ``(images,)`` when ``return_dict`` is ``False``.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}; expected one of {list(OUTPUT_TYPES)}")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        unknown = sorted(set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs))
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown}; "
                             f"expected names in {self._callback_tensor_inputs}")

        device = self._execution_device
        labels = self._class_labels(class_labels, batch_size, device)
        config = self.unet.config
        size = (config.sample_size,) * 2 if isinstance(config.sample_size, int) else tuple(config.sample_size)
        shape = (batch_size, config.in_channels, *size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {shape}")
        self.scheduler.set_timesteps(num_inference_steps, device=device)  # sets init_noise_sigma (EDM: sigma_max)
        latents = latents.to(device=device, dtype=self.unet.dtype) * self.scheduler.init_noise_sigma
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = self.scheduler.scale_model_input(latents, t)
            output = self.unet(model_input, t, class_labels=labels, return_dict=False)[0]
            latents = self.scheduler.step(output, t, latents, generator=generator, return_dict=False)[0]
            if callback_on_step_end is not None:
                available = {"latents": latents}
                tensors = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                latents = callback_on_step_end(self, i, t, tensors).pop("latents", latents)

        image = (latents / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

"""Student pipelines and export to diffusers: ``export_student`` and ``FewStepPipeline``."""

from fastgen.pipelines.export import export_student
from fastgen.pipelines.few_step import FewStepPipeline

__all__ = ["FewStepPipeline", "export_student"]

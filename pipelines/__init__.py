"""Student pipelines, export to diffusers and loading of exports: ``export_student``, ``load_pipeline``,
``FewStepPipeline``."""

from fastgen.pipelines.export import export_student
from fastgen.pipelines.few_step import FewStepPipeline
from fastgen.pipelines.load import load_pipeline

__all__ = ["FewStepPipeline", "export_student", "load_pipeline"]

"""Student pipelines, export to diffusers and loading of exports: ``export_student``, ``load_pipeline``,
``FewStepPipeline`` and ``TimestepExperts`` (a student of experts as one model)."""

from fastgen.pipelines.experts_model import TimestepExperts
from fastgen.pipelines.export import export_student
from fastgen.pipelines.few_step import FewStepPipeline
from fastgen.pipelines.load import load_pipeline

__all__ = ["FewStepPipeline", "TimestepExperts", "export_student", "load_pipeline"]

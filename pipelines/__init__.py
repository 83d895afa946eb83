"""Student pipelines, export to diffusers and loading of exports: ``export_student``, ``load_pipeline``,
``FewStepPipeline``, ``TimestepExperts`` (a student of experts as one model) and ``MeanFlowModel`` (a MeanFlow
student's network with its interval input)."""

from fastgen.pipelines.experts_model import TimestepExperts
from fastgen.pipelines.export import export_student
from fastgen.pipelines.few_step import FewStepPipeline
from fastgen.pipelines.load import load_pipeline
from fastgen.pipelines.meanflow_model import MeanFlowModel

__all__ = ["FewStepPipeline", "MeanFlowModel", "TimestepExperts", "export_student", "load_pipeline"]

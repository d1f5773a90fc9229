"""ssdd: self-supervised dataset distillation.

The public API mirrors the command line: ``load_dataset`` / ``list_datasets`` (data), ``create_model`` /
``list_models`` (model zoo), ``train_teacher`` / ``load_teacher`` / ``teacher_features`` (teachers),
``distill`` / ``list_methods`` (distillation), ``load_distilled`` (sets) and ``evaluate`` (protocols).
"""

from ssdd.budget import Budget
from ssdd.data import list_datasets, load_dataset
from ssdd.distilled import DistilledSet, load_distilled
from ssdd.evaluation import EvaluationConfig, evaluate
from ssdd.methods import distill, list_methods
from ssdd.models import create_model, list_models
from ssdd.teachers import TeacherConfig, load_teacher, teacher_features, train_teacher
from ssdd.version import __version__

__all__ = [
    "Budget", "DistilledSet", "EvaluationConfig", "TeacherConfig", "__version__", "create_model", "distill",
    "evaluate", "list_datasets", "list_methods", "list_models", "load_dataset", "load_distilled", "load_teacher",
    "teacher_features", "train_teacher",
]

"""ssdd: self-supervised dataset distillation.

The public API mirrors the command line: ``load_dataset`` / ``list_datasets`` (data), ``create_model`` /
``list_models`` (model zoo), ``train_teacher`` / ``load_teacher`` / ``teacher_features`` (teachers),
``distill`` / ``list_methods`` (distillation), ``load_distilled`` (sets) and ``evaluate`` (protocols).
"""

__version__ = "0.1.0"

from ssdd.data import list_datasets, load_dataset  # noqa: E402
from ssdd.distilled import DistilledSet, load_distilled  # noqa: E402
from ssdd.evaluation import EvaluationConfig, evaluate  # noqa: E402
from ssdd.methods import Budget, distill, list_methods  # noqa: E402
from ssdd.models import create_model, list_models  # noqa: E402
from ssdd.teachers import TeacherConfig, load_teacher, teacher_features, train_teacher  # noqa: E402

__all__ = [
    "Budget", "DistilledSet", "EvaluationConfig", "TeacherConfig", "__version__", "create_model", "distill",
    "evaluate", "list_datasets", "list_methods", "list_models", "load_dataset", "load_distilled", "load_teacher",
    "teacher_features", "train_teacher",
]

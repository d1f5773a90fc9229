"""Self-supervised teachers: SSL losses, pre-training, importing teachers trained elsewhere, the teacher artefact
and the teacher-feature cache."""

from ssdd.teachers.artefact import Teacher, load_teacher, save_teacher
from ssdd.teachers.features import teacher_features
from ssdd.teachers.importer import import_teacher
from ssdd.teachers.losses import BarlowTwinsLoss, NTXentLoss, make_projector
from ssdd.teachers.train import TeacherConfig, train_teacher

__all__ = [
    "BarlowTwinsLoss", "NTXentLoss", "Teacher", "TeacherConfig", "import_teacher", "load_teacher", "make_projector",
    "save_teacher", "teacher_features", "train_teacher",
]

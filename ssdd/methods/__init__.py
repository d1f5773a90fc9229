"""Distillation methods behind one interface and registry (:class:`Method`, ``METHODS``), and the engine that
runs any of them (:func:`distill`)."""

from ssdd.methods import coreset, decoupled  # noqa: F401  (register every method)
from ssdd.methods.base import METHODS, DistillContext, Method, list_methods
from ssdd.methods.engine import Distillation, DistillConfig, MonitorSettings, distill, distill_preset, prepare
from ssdd.methods.feature_matching import dm, gradient_matching  # noqa: F401
from ssdd.methods.kernel_ridge import frepo, krr_st, paa  # noqa: F401
from ssdd.methods.trajectory import matching  # noqa: F401

__all__ = ["METHODS", "DistillConfig", "DistillContext", "Distillation", "Method", "MonitorSettings",
           "distill", "distill_preset", "list_methods", "prepare"]

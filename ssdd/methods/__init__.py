"""Distillation methods behind one interface and registry (:class:`Method`, ``METHODS``), and the engine that
runs any of them (:func:`distill`)."""

from ssdd.methods import coreset, decoupled, dm, frepo, gradient_matching, krr_st, matching, paa  # noqa: F401  (register every method)
from ssdd.methods.base import METHODS, DistillContext, Method, list_methods
from ssdd.methods.engine import Distillation, DistillConfig, MonitorSettings, distill, distill_preset, prepare

__all__ = ["METHODS", "DistillConfig", "DistillContext", "Distillation", "Method", "MonitorSettings",
           "distill", "distill_preset", "list_methods", "prepare"]

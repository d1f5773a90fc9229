"""Evaluation: protocols (linear, knn, finetune, supervised), baselines, probes and reports."""

from ssdd.evaluation.evaluate import Cell, EvaluationConfig, evaluate
from ssdd.evaluation.journal import clear_journal
from ssdd.evaluation.protocols import PROTOCOLS, ProtocolSettings
from ssdd.evaluation.report import read_results, write_report

__all__ = ["PROTOCOLS", "Cell", "EvaluationConfig", "ProtocolSettings", "clear_journal", "evaluate",
           "read_results", "write_report"]

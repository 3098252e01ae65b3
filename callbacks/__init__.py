"""Callbacks: diagnostics that work on any module offering the matching capability, plus pictures."""

from callbacks.divergence import DivergenceEstimator
from callbacks.eigen import EigenvalueTracker
from callbacks.elbo_gap import ELBOGapMonitor
from callbacks.preemption import PreemptionCheckpoint
from callbacks.quality import ModeCoverage
from callbacks.samples import SampleGrid
from callbacks.summary import RunSummary

__all__ = [
    "DivergenceEstimator",
    "ELBOGapMonitor",
    "EigenvalueTracker",
    "ModeCoverage",
    "PreemptionCheckpoint",
    "RunSummary",
    "SampleGrid",
]

"""Callbacks: diagnostics that work on any module offering the matching capability, plus pictures."""

from callbacks.compile import Compile
from callbacks.density import DensityMap
from callbacks.divergence import DivergenceEstimator
from callbacks.eigen import EigenvalueTracker
from callbacks.elbo_gap import ELBOGapMonitor
from callbacks.preemption import PreemptionCheckpoint
from callbacks.quality import ModeCoverage
from callbacks.sample_quality import SampleQuality
from callbacks.samples import SampleGrid
from callbacks.summary import RunSummary

__all__ = [
    "Compile",
    "DensityMap",
    "DivergenceEstimator",
    "ELBOGapMonitor",
    "EigenvalueTracker",
    "ModeCoverage",
    "PreemptionCheckpoint",
    "RunSummary",
    "SampleGrid",
    "SampleQuality",
]

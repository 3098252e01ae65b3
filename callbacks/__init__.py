"""Callbacks: diagnostics that work on any module offering the matching capability, plus pictures."""

from callbacks.eigen import EigenvalueTracker
from callbacks.quality import ModeCoverage
from callbacks.samples import SampleGrid
from callbacks.summary import RunSummary

__all__ = ["EigenvalueTracker", "ModeCoverage", "RunSummary", "SampleGrid"]

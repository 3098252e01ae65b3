"""Callbacks: diagnostics that work on any module offering the matching capability, plus pictures."""

from callbacks.samples import SampleGrid
from callbacks.summary import RunSummary

__all__ = ["RunSummary", "SampleGrid"]

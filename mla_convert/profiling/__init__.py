"""Profiling and comparison: measured cache, speed and memory of models (``mla-convert profile``),
and one table with plots out of evaluation, conversion, fine-tuning and profile JSONs
(``mla-convert compare``)."""

from .compare import compare_results
from .profile import PROFILE_KIND, format_profile, profile_models

__all__ = ["PROFILE_KIND", "compare_results", "format_profile", "profile_models"]

"""The evaluator's exceptions, and the one-line form of an error it reports."""

from __future__ import annotations

from ..errors import MlaConvertError, UnsupportedModelError


class EvaluationError(MlaConvertError):
    """Bad evaluation request: wrong device, conflicting output files, damaged journal..."""


class NotSpeechRecognitionError(UnsupportedModelError):
    """The model has no CTC or sequence-to-sequence speech recognition head."""

"""mla_convert: turn the multi-head attention of trained HF speech models into MLA, GQA or linear
attention by module surgery seeded from the trained weights.

The public names are imported lazily, so that commands that need neither torch nor transformers
(``mla-convert push`` failing offline, ``--help``) answer at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .version import __version__

_EXPORTS = {
    "convert": ".surgery",
    "load": ".loading",
    "ConversionReport": ".report",
    "LayerReport": ".report",
    "GQASpec": ".specs",
    "LinearSpec": ".specs",
    "MLASpec": ".specs",
    "spec_from_dict": ".specs",
    "MlaConvertError": ".errors",
    "ModelNotFoundError": ".errors",
    "SpecError": ".errors",
    "UnsupportedModelError": ".errors",
}

__all__ = [
    "ConversionReport",
    "GQASpec",
    "LayerReport",
    "LinearSpec",
    "MLASpec",
    "MlaConvertError",
    "ModelNotFoundError",
    "SpecError",
    "UnsupportedModelError",
    "__version__",
    "convert",
    "load",
    "spec_from_dict",
]

if TYPE_CHECKING:
    from .errors import MlaConvertError, ModelNotFoundError, SpecError, UnsupportedModelError
    from .loading import load
    from .report import ConversionReport, LayerReport
    from .specs import GQASpec, LinearSpec, MLASpec, spec_from_dict
    from .surgery import convert


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mla_convert' has no attribute {name!r}")

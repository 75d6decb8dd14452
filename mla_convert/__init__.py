"""mla_convert: turn the multi-head attention of trained HF speech models into MLA, GQA or linear
attention by module surgery seeded from the trained weights."""

__version__ = "0.1.0"

from .convert import convert  # noqa: E402
from .errors import MlaConvertError, ModelNotFoundError, SpecError, UnsupportedModelError  # noqa: E402
from .loading import load  # noqa: E402
from .report import ConversionReport, LayerReport  # noqa: E402
from .specs import GQASpec, LinearSpec, MLASpec, spec_from_dict  # noqa: E402

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

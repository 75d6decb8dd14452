"""What a conversion should produce: small validated config objects (torchao/PEFT style).

A spec knows nothing about host models; ``validate`` checks it against the attention geometry it
is applied to, and ``layer_spec`` is the typed per-layer spec (:class:`~.modeling.attention_base.LayerSpec`)
whose dict is stored per layer in the converted model's ``config.json`` (the remote code rebuilds
modules from that alone). How each spec type seeds its layers is :data:`mla_convert.init.seeders.SEEDERS`.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, ClassVar

from .errors import SpecError

if TYPE_CHECKING:  # the layer specs live beside their modules (torch); the CLI imports specs without it
    from .modeling.attention_gqa import GQALayerSpec
    from .modeling.attention_linear import LinearLayerSpec
    from .modeling.attention_mla import MLALayerSpec

MLA_INITS = ("svd", "svd-split", "calibrated")
MLA_OBJECTIVES = ("kv", "attention")
BUDGET_ALLOCATIONS = ("measured", "spectral")
GQA_INITS = ("mean-pool", "calibrated")
FEATURE_MAPS = ("elu", "relu", "hedgehog")


def _type_name(value: object) -> str:
    return type(value).__name__


def _check_types(spec: object, kinds: dict[str, str]) -> None:
    """Raise :class:`SpecError` for the first field whose value is not of its kind.

    Kinds: ``int`` (an integer, never a bool), ``int?`` (or None), ``real`` (an int or float, never a
    bool), ``real?``, ``bool`` and ``str``. ``True`` is an int to Python, but ``latent_dim=True`` is a
    mistake, not a latent of one value.
    """
    for name, kind in kinds.items():
        value = getattr(spec, name)
        if kind.endswith("?"):
            if value is None:
                continue
            kind = kind[:-1]
        if kind == "int":
            ok, wanted = isinstance(value, numbers.Integral) and not isinstance(value, bool), "an integer"
        elif kind == "real":
            ok, wanted = isinstance(value, numbers.Real) and not isinstance(value, bool), "a number"
        elif kind == "bool":
            ok, wanted = isinstance(value, bool), "True or False"
        else:
            ok, wanted = isinstance(value, str), "a string"
        if not ok:
            optional = " (or None)" if kinds[name].endswith("?") else ""
            raise SpecError(
                f"{type(spec).__name__}.{name} must be {wanted}{optional}, got {value!r} ({_type_name(value)})"
            )


class _InitCalibration:
    """Specs whose ``init="calibrated"`` asks for calibration audio."""

    init: str

    @property
    def needs_calibration(self) -> bool:
        return self.init == "calibrated"

    @property
    def calibrated_option(self) -> str:
        """The option that asked for calibration, for error messages."""
        return f"--init {self.init}"


@dataclass(frozen=True)
class MLASpec(_InitCalibration):
    """Multi-head latent attention with a ``latent_dim``-wide K/V latent per token.

    ``init="svd"`` seeds one latent shared by K and V from a truncated SVD of ``[W_k; W_v]``;
    ``"svd-split"`` gives K and V ``latent_dim/2`` each from two separate SVDs (for comparison);
    ``"calibrated"`` minimises the K/V error on real layer inputs (whitened SVD; needs calibration
    audio). ``objective="attention"`` (the default) weighs each key head by the queries that read it
    and each value head by its slice of the output projection, so the latent keeps what reaches the
    attention scores and the layer output; ``"kv"`` fits K and V themselves. ``balance_kv`` scales
    the key side against the value side before the joint SVD, ``damping`` regularises the
    whitening. The defaults were the best setting at every latent size measured on Whisper tiny.en
    (results/whisper_tiny_en_calibrated*.md).
    ``cache_budget`` (instead of ``latent_dim``) is the fraction of the original K/V values per
    token, summed over the converted layers. ``budget_allocation="measured"`` (the default; it
    needs calibration audio) shares it out by the measured divergence of the model's output on
    held-out calibration audio when each layer alone gets a candidate size, and keeps whichever of
    that allocation, a uniform split and the spectral one the held-out output prefers;
    ``"spectral"`` (and any budget without calibration audio) uses the predicted K/V error of the
    (calibrated) spectra alone.
    """

    latent_dim: int | None = None
    init: str = "svd"
    cache_budget: float | None = None
    balance_kv: bool = True
    damping: float = 1e-4
    objective: str = "attention"
    budget_allocation: str = "measured"
    attention: ClassVar[str] = "mla"

    def __post_init__(self) -> None:
        _check_types(
            self,
            {
                "latent_dim": "int?",
                "init": "str",
                "cache_budget": "real?",
                "balance_kv": "bool",
                "damping": "real",
                "objective": "str",
                "budget_allocation": "str",
            },
        )

    @property
    def latent_layout(self) -> str:
        return "split" if self.init == "svd-split" else "joint"

    def validate(self, hidden_size: int, num_heads: int) -> None:
        if self.init not in MLA_INITS:
            raise SpecError(f"unknown MLA init {self.init!r}; choose one of {', '.join(MLA_INITS)}")
        if self.objective not in MLA_OBJECTIVES:
            raise SpecError(f"unknown MLA objective {self.objective!r}; choose one of {', '.join(MLA_OBJECTIVES)}")
        if self.damping < 0:
            raise SpecError(f"damping must be >= 0 (it is added to the covariance), got {self.damping}")
        if self.budget_allocation not in BUDGET_ALLOCATIONS:
            raise SpecError(
                f"unknown budget allocation {self.budget_allocation!r}; choose one of {', '.join(BUDGET_ALLOCATIONS)}"
            )
        if (self.latent_dim is None) == (self.cache_budget is None):
            raise SpecError("give exactly one of latent_dim (--latent-dim) and cache_budget (--cache-budget)")
        if self.cache_budget is not None:
            if self.latent_layout == "split":
                raise SpecError("--cache-budget needs the joint latent (--init svd or calibrated)")
            if not 0 < self.cache_budget <= 0.5:
                raise SpecError(
                    f"cache_budget is a fraction of the original K/V values per token in (0, 0.5] "
                    f"(0.5 is a lossless joint latent), got {self.cache_budget}"
                )
            return
        limit = hidden_size if self.latent_layout == "joint" else 2 * hidden_size
        if not 0 < self.latent_dim <= limit:
            raise SpecError(
                f"latent_dim must be in 1..{limit} for a {self.latent_layout} latent of a "
                f"hidden size {hidden_size} model (above that nothing is saved), got {self.latent_dim}"
            )
        if self.latent_layout == "split" and self.latent_dim % 2:
            raise SpecError(f"--init svd-split needs an even latent_dim, got {self.latent_dim}")

    def layer_spec(self, latent_dim: int | None = None) -> MLALayerSpec:
        """One layer's spec; ``latent_dim`` overrides (the size a cache budget gave that layer)."""
        from .modeling.attention_mla import MLALayerSpec

        return MLALayerSpec(latent_dim or self.latent_dim, self.latent_layout, self.init)


@dataclass(frozen=True)
class GQASpec(_InitCalibration):
    """Grouped-query attention with ``kv_heads`` K/V heads.

    ``init="mean-pool"`` averages contiguous groups of heads (the GQA paper's recipe);
    ``"calibrated"`` groups heads whose keys/values behave alike on calibration audio and merges
    each group with the shared projection that best preserves the attention scores (keys) and the
    output (values), i.e. weighted least squares on the calibration activations.
    """

    kv_heads: int
    init: str = "mean-pool"
    attention: ClassVar[str] = "gqa"

    def __post_init__(self) -> None:
        _check_types(self, {"kv_heads": "int", "init": "str"})

    def validate(self, hidden_size: int, num_heads: int) -> None:
        if self.init not in GQA_INITS:
            raise SpecError(f"unknown GQA init {self.init!r}; choose one of {', '.join(GQA_INITS)}")
        if self.kv_heads <= 0 or num_heads % self.kv_heads:
            raise SpecError(f"kv_heads must divide the {num_heads} attention heads, got {self.kv_heads}")

    def layer_spec(self, latent_dim: int | None = None) -> GQALayerSpec:
        from .modeling.attention_gqa import GQALayerSpec

        return GQALayerSpec(self.kv_heads, self.init)


@dataclass(frozen=True)
class LinearSpec:
    """Kernelised linear attention with feature map φ; the trained projections are kept.

    ``elu`` (elu+1) and ``relu`` are fixed maps; ``hedgehog`` is learnable and is fitted on
    calibration audio to reproduce each layer's softmax attention weights (attention transfer).
    """

    feature_map: str = "elu"
    init: str = "copy"
    transfer_steps: int = 300
    attention: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        _check_types(self, {"feature_map": "str", "init": "str", "transfer_steps": "int"})
        if self.transfer_steps < 1:
            raise SpecError(f"LinearSpec.transfer_steps must be at least 1, got {self.transfer_steps}")

    @property
    def needs_calibration(self) -> bool:
        return self.feature_map == "hedgehog"

    @property
    def calibrated_option(self) -> str:
        """The option that asked for calibration, for error messages."""
        return f"--feature-map {self.feature_map}"

    def validate(self, hidden_size: int, num_heads: int) -> None:
        if self.feature_map not in FEATURE_MAPS:
            raise SpecError(f"unknown feature map {self.feature_map!r}; choose one of {', '.join(FEATURE_MAPS)}")

    def layer_spec(self, latent_dim: int | None = None) -> LinearLayerSpec:
        from .modeling.attention_linear import LinearLayerSpec

        return LinearLayerSpec(self.feature_map, self.init)


AttentionSpec = MLASpec | GQASpec | LinearSpec
SPEC_CLASSES: dict[str, type] = {"mla": MLASpec, "gqa": GQASpec, "linear": LinearSpec}


def spec_to_dict(spec: AttentionSpec) -> dict:
    """The spec as stored in configs and reports: its kind, size and init, plus any option that
    differs from its default."""
    defaults = {f.name: f.default for f in fields(spec)}
    core = {"latent_dim", "kv_heads", "feature_map", "init"}
    values = {k: v for k, v in asdict(spec).items() if v is not None and (k in core or v != defaults[k])}
    return {"attention": spec.attention, **values}


def spec_from_dict(data: dict) -> AttentionSpec:
    data = dict(data)
    kind = data.pop("attention", None)
    if kind not in SPEC_CLASSES:
        raise SpecError(f"unknown attention kind {kind!r}; choose one of {', '.join(SPEC_CLASSES)}")
    data.pop("latent_layout", None)
    cls = SPEC_CLASSES[kind]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(f"unknown {kind} spec field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**data)

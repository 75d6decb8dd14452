"""Conversion reports: per-layer errors and K/V-state sizes, as JSON and as a printed table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

# Variants whose K/V projections are kept as trained: a K/V error against them is not defined (0 by
# construction), and the table says so instead of showing 0.0000.
NO_KV_ERROR = {"linear"}


@dataclass
class LayerReport:
    path: str
    role: str
    attention: str
    k_weight_error: float
    v_weight_error: float
    state_bytes_per_frame_before: int
    state_bytes_per_frame_after: int
    fixed_state_bytes_after: int = 0
    k_activation_error: float | None = None
    v_activation_error: float | None = None
    transfer_loss_before: float | None = None
    transfer_loss_after: float | None = None


@dataclass
class ConversionReport:
    """What ``mla_convert.convert`` did; ``to_dict()`` is what ``conversion_report.json`` holds."""

    model_type: str
    spec: dict
    dtype: str
    base_model: str | None = None
    layers: list[LayerReport] = field(default_factory=list)
    approximations: list[str] = field(default_factory=list)
    calibration_batches: int = 0
    held_out_batches: int = 0
    calibration_seconds: float = 0.0
    calibration_sources: list[str] = field(default_factory=list)
    calibration_text: bool = False
    calibration_ids: list[str] = field(default_factory=list)
    held_out_ids: list[str] = field(default_factory=list)
    seconds: float = 0.0
    budget_search: dict | None = None

    @property
    def state_bytes_per_frame_before(self) -> int:
        return sum(layer.state_bytes_per_frame_before for layer in self.layers)

    @property
    def state_bytes_per_frame_after(self) -> int:
        return sum(layer.state_bytes_per_frame_after for layer in self.layers)

    @property
    def state_ratio(self) -> float:
        before = self.state_bytes_per_frame_before
        return self.state_bytes_per_frame_after / before if before else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["totals"] = {
            "converted_layers": len(self.layers),
            "state_bytes_per_frame_before": self.state_bytes_per_frame_before,
            "state_bytes_per_frame_after": self.state_bytes_per_frame_after,
            "state_ratio": self.state_ratio,
            "fixed_state_bytes_after": sum(layer.fixed_state_bytes_after for layer in self.layers),
            "state_bytes_per_frame_by_role": self.state_bytes_by_role(),
        }
        return data

    def state_bytes_by_role(self) -> dict[str, dict[str, int]]:
        """Per role (``encoder``, ``decoder``, ``cross`` ...), the converted layers' state bytes per
        position before and after; a cross-attention's positions are the encoder's frames."""
        roles: dict[str, dict[str, int]] = {}
        for layer in self.layers:
            role = roles.setdefault(layer.role, {"layers": 0, "before": 0, "after": 0})
            role["layers"] += 1
            role["before"] += layer.state_bytes_per_frame_before
            role["after"] += layer.state_bytes_per_frame_after
        return roles

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format_table(self) -> str:
        with_activations = any(layer.k_activation_error is not None for layer in self.layers)
        header = ["layer", "attention", "K err (W)", "V err (W)"]
        if with_activations:
            header += ["K err (act)", "V err (act)"]
        header += ["bytes/frame before", "after"]
        rows = [header]
        for layer in self.layers:
            defined = layer.attention not in NO_KV_ERROR
            row = [
                layer.path,
                layer.attention,
                _fmt(layer.k_weight_error, defined),
                _fmt(layer.v_weight_error, defined),
            ]
            if with_activations:
                row += [_fmt(layer.k_activation_error, defined), _fmt(layer.v_activation_error, defined)]
            row += [str(layer.state_bytes_per_frame_before), str(layer.state_bytes_per_frame_after)]
            rows.append(row)
        total = ["total", "", "", ""] + (["", ""] if with_activations else [])
        total += [str(self.state_bytes_per_frame_before), str(self.state_bytes_per_frame_after)]
        rows.append(total)
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths))
        summary = (
            f"K/V state per frame: {self.state_bytes_per_frame_before} -> {self.state_bytes_per_frame_after} bytes "
            f"({100 * self.state_ratio:.1f}% of the original), {self.seconds:.1f} s"
        )
        notes = [f"note: {text}" for text in self.approximations]
        if any(layer.attention in NO_KV_ERROR for layer in self.layers):
            notes.append("note: K/V errors are n/a for linear attention: it keeps the trained K/V projections")
        search = self.budget_search
        if search and "chosen" in search:
            compared = ", ".join(
                f"{name} {candidate['divergence']:.4g}" for name, candidate in search["candidates"].items()
            )
            notes.insert(
                0,
                f"cache budget {search['budget']}: sizes {search['ranks']} ({search['chosen']}; held-out output "
                f"{search['metric']}: {compared})",
            )
        elif search:
            notes.insert(0, f"cache budget {search['budget']}: sizes {search['ranks']} ({search['allocation']})")
        return "\n".join([*lines, summary, *notes])


def _fmt(value: float | None, defined: bool = True) -> str:
    """A K/V error cell: ``n/a`` where the error is not defined, ``-`` where it was not measured."""
    if not defined:
        return "n/a"
    return "-" if value is None else f"{value:.4f}"

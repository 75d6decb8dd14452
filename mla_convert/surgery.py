"""The surgery loop: host adapter -> attention sites -> spec -> seed -> replace -> report."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import fields, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import collect_statistics, observe_sites
from .errors import SpecError, UnsupportedModelError
from .hosts import AttentionSite, AttentionWeights, HostAdapter, adapter_for
from .init.attention_transfer import fit_feature_maps
from .init.budget import allocate_measured, allocate_ranks, candidate_ranks
from .init.seeders import effective_kv_weights, latent_spectrum, seed_attention
from .init.svd import relative_error
from .modeling.attention_base import LayerSpec, mha_state_values
from .modeling.attention_build import build_attention
from .modeling.attention_gqa import GQALayerSpec
from .report import ConversionReport, LayerReport
from .specs import AttentionSpec, spec_to_dict
from .version import __version__

LINEAR_RELATIVE_NOTE = (
    "linear attention drops the additive relative-position term (Transformer-XL matrices b+d), "
    "which a kernel feature map cannot carry; the content-query bias pos_bias_u is kept"
)


def convert(
    model: nn.Module,
    spec: AttentionSpec,
    layers: Sequence[int] | None = None,
    targets: Sequence[str] | None = None,
    calibration: Iterable[dict] | None = None,
    held_out: Iterable[dict] | None = None,
    progress: bool = False,
) -> ConversionReport:
    """Replace the multi-head attention of ``model`` in place, seeded from its trained weights.

    ``layers`` limits the conversion to those layer indices; ``targets`` picks attention roles
    where a host has several (e.g. Whisper's decoder self-attention vs cross-attention).
    ``calibration`` is an iterable of model-input dicts (e.g. ``{"input_values": ...}``): calibrated
    inits are fitted to the layer inputs it produces, and the report gives the K/V errors measured
    on ``held_out`` batches (on ``calibration`` itself when no held-out batches are given).
    Afterwards the model is an ordinary HF model of the converted class: ``save_pretrained``
    writes the spec into ``config.json`` and the modeling code next to the weights.
    """
    started = time.perf_counter()
    adapter = adapter_for(model)
    if adapter.is_converted(model):
        raise UnsupportedModelError("this model is already converted; convert the original model instead")
    roles = _resolve_roles(adapter, targets)
    sites = adapter.sites(model, roles)
    if layers is not None:
        wanted = set(layers)
        unknown = wanted - {site.layer_index for site in sites}
        if unknown:
            raise SpecError(f"no attention layer(s) {sorted(unknown)} in this model (it has {len(sites)})")
        sites = [site for site in sites if site.layer_index in wanted]
    if not sites:
        raise UnsupportedModelError(f"no {'/'.join(roles)} attention left to convert in this model")

    config = model.config
    parameter = next(model.parameters())
    dtype, device = parameter.dtype, parameter.device
    report = ConversionReport(
        model_type=config.model_type, spec=spec_to_dict(spec), dtype=str(dtype).replace("torch.", "")
    )
    if spec.needs_calibration and calibration is None:
        raise SpecError(f"{spec.calibrated_option} needs calibration audio (--calibration)")
    statistics = transfer_samples = None
    if calibration is not None:
        calibration = list(calibration)
        report.calibration_batches = len(calibration)
        started_calibration = time.perf_counter()
        statistics = collect_statistics(model, adapter, sites, calibration)
        if getattr(spec, "feature_map", None) == "hedgehog":
            transfer_samples = _capture_attention_samples(model, adapter, sites, calibration)
        report.calibration_seconds = time.perf_counter() - started_calibration
    evaluation = list(held_out) if held_out is not None else calibration
    captured = _capture_site_inputs(model, adapter, sites, evaluation) if evaluation is not None else None
    if held_out is not None:
        report.held_out_batches = len(evaluation)
    itemsize = torch.empty((), dtype=dtype).element_size()
    all_weights = {site.path: _float_weights(adapter.read_weights(site, config)) for site in sites}
    for weights in all_weights.values():
        spec.validate(weights.geometry.hidden_size, weights.geometry.num_heads)
    latent_dims, report.budget_search = _budgeted_latent_dims(
        spec, model, adapter, sites, all_weights, statistics, evaluation, progress
    )
    layer_specs: dict[str, LayerSpec] = {}
    position_modes: set[str] = set()

    for site in tqdm(sites, desc="converting attention", unit="layer", disable=not progress):
        weights = all_weights[site.path]
        position_modes.add(weights.position_mode)
        layer_spec = spec.layer_spec(latent_dims.get(site.path))
        site_statistics = statistics[site.path] if statistics is not None else None
        replacement, weights = _seeded_replacement(adapter, config, site, layer_spec, weights, spec, site_statistics)
        attention = adapter.attention_of(replacement)
        transfer = None
        if transfer_samples is not None:
            transfer = fit_feature_maps(
                attention,
                _reference_attention(weights, config, is_causal=attention.is_causal),
                transfer_samples[site.path],
                spec.transfer_steps,
            )
        layer = _layer_report(site, attention, weights, itemsize)
        if transfer is not None:
            layer.transfer_loss_before, layer.transfer_loss_after = transfer
        if captured is not None:
            layer.k_activation_error, layer.v_activation_error = _activation_errors(
                attention, weights, captured[site.path], config
            )
        replacement.to(device=device, dtype=dtype)
        replacement.train(site.module.training)
        _replace_submodule(adapter.base_model(model), site.path, replacement)
        layer_specs[site.path] = layer_spec
        report.layers.append(layer)

    if spec.attention == "linear" and "relative" in position_modes:
        report.approximations.append(LINEAR_RELATIVE_NOTE)
    adapter.mark_converted(
        model,
        {
            "format_version": 1,
            "toolkit": f"mla_convert {__version__}",
            "host": adapter.name,
            "spec": spec_to_dict(spec),
            "layers": {path: layer.to_dict() for path, layer in layer_specs.items()},
            "approximations": report.approximations,
        },
    )
    report.seconds = time.perf_counter() - started
    return report


def _seeded_replacement(adapter: HostAdapter, config, site, layer_spec: LayerSpec, weights, spec, statistics):
    """``(module, weights)``: the replacement for ``site`` built from ``layer_spec`` and seeded (float32,
    CPU), with the weights it reproduces at full rank (see :func:`seed_attention`)."""
    with torch.device("meta"):
        replacement = adapter.build_module(config, layer_spec, site)
    replacement.to_empty(device="cpu")
    replacement.float()
    weights = seed_attention(adapter.attention_of(replacement), weights, spec, statistics)
    return replacement, weights


def _budgeted_latent_dims(
    spec, model, adapter, sites, all_weights, statistics, evaluation, progress
) -> tuple[dict[str, int], dict | None]:
    """Per-layer latent sizes when the spec gives a cache budget instead of one size, and how
    they were chosen (``None`` without a budget).

    ``budget_allocation="measured"`` (with calibration audio): every layer is converted alone at
    a few candidate sizes and the divergence of the model's output from the original's is
    measured on the held-out calibration batches; the sizes with the least summed divergence that
    spend the budget exactly are then checked jointly against a uniform split and the spectral
    prediction, and the allocation the held-out output prefers is kept. Otherwise the calibrated
    (or plain) spectra decide alone.
    """
    if getattr(spec, "cache_budget", None) is None:
        return {}, None
    paths = [site.path for site in sites]
    spectra = [latent_spectrum(all_weights[path], spec, statistics and statistics[path]) for path in paths]
    widths = [all_weights[path].geometry.hidden_size for path in paths]
    budget = budget_values(spec.cache_budget, widths)
    spectral = allocate_ranks(spectra, budget, minimum=1, maximum=widths)
    search: dict = {"budget": budget, "allocation": spec.budget_allocation}
    if spec.budget_allocation == "spectral" or statistics is None or not evaluation:
        if spec.budget_allocation == "measured":
            search["allocation"] = "spectral (no calibration audio to measure on)"
        search["ranks"] = spectral
        return dict(zip(paths, spectral, strict=True)), search

    measure = _OutputDivergence(model, adapter, sites, evaluation)
    unit, candidates = candidate_ranks(budget, widths)

    site_at = {site.path: site for site in sites}

    def divergence(ranks: dict[str, int]) -> float:
        replacements = {
            path: _seeded_replacement(
                adapter, model.config, site_at[path], spec.layer_spec(rank), all_weights[path], spec, statistics[path]
            )[0]
            for path, rank in ranks.items()
        }
        return measure(replacements)

    per_layer = []
    with tqdm(total=sum(map(len, candidates)), desc="measuring budget sizes", disable=not progress) as bar:
        for path, ranks in zip(paths, candidates, strict=True):
            errors = {}
            for rank in ranks:
                errors[rank] = divergence({path: rank})
                bar.update()
            per_layer.append(errors)
    measured = allocate_measured(per_layer, unit * (budget // unit))
    measured = allocate_ranks(spectra, budget, maximum=widths, start=measured)  # the remainder, by the spectra
    share = [min(budget // len(paths), width) for width in widths]
    uniform = allocate_ranks(spectra, budget, maximum=widths, start=share)
    choices = {"measured": measured, "uniform": uniform, "spectral": spectral}
    joint = {name: divergence(dict(zip(paths, ranks, strict=True))) for name, ranks in choices.items()}
    chosen = min(joint, key=joint.get)
    search.update(
        metric=measure.metric,
        held_out_batches=len(evaluation),
        per_layer={path: errors for path, errors in zip(paths, per_layer, strict=True)},
        candidates={name: {"ranks": ranks, "divergence": joint[name]} for name, ranks in choices.items()},
        chosen=chosen,
        ranks=choices[chosen],
    )
    return dict(zip(paths, choices[chosen], strict=True)), search


def _replace_submodule(base: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``path`` below ``base``; returns the module that was there."""
    parent_path, _, name = path.rpartition(".")
    parent = base.get_submodule(parent_path)
    previous = getattr(parent, name)
    setattr(parent, name, module)
    return previous


def budget_values(cache_budget: float, widths: Sequence[int]) -> int:
    """The latent values per token a ``cache_budget`` fraction buys over layers of these hidden
    sizes; a one-line error when that cannot give every layer at least one."""
    budget = int(round(cache_budget * sum(2 * width for width in widths)))
    if budget < len(widths):
        least = len(widths) / sum(2 * width for width in widths)
        raise SpecError(
            f"--cache-budget {cache_budget:g} buys {budget} latent values per token for {len(widths)} layers; "
            f"every layer needs at least one (a budget of at least {least:.2g})"
        )
    return budget


class _OutputDivergence:
    """How far the model's output moves from the original's on held-out batches when some
    attention modules are swapped for others: mean KL(original ‖ swapped) per output position for
    models with logits, else the relative squared error of the last hidden state."""

    def __init__(self, model: nn.Module, adapter: HostAdapter, sites, batches) -> None:
        self.model, self.adapter = model, adapter
        with torch.no_grad():
            self.batches = adapter.measurement_batches(model, sites, batches)
            self.reference = self._outputs()
        self.metric = "kl" if self.has_logits else "relative_mse"

    @torch.no_grad()
    def _outputs(self) -> list[torch.Tensor]:
        was_training = self.model.training
        self.model.eval()
        outputs = []
        try:
            for batch in self.batches:
                result = self.model(**batch)
                self.has_logits = getattr(result, "logits", None) is not None
                if self.has_logits:
                    outputs.append(torch.log_softmax(result.logits.float(), dim=-1))
                else:
                    outputs.append(result.last_hidden_state.float())
        finally:
            self.model.train(was_training)
        return outputs

    def __call__(self, replacements: dict[str, nn.Module]) -> float:
        parameter = next(self.model.parameters())
        base = self.adapter.base_model(self.model)
        originals = {
            path: _replace_submodule(base, path, module.to(device=parameter.device, dtype=parameter.dtype))
            for path, module in replacements.items()
        }
        try:
            outputs = self._outputs()
        finally:
            for path, module in originals.items():
                _replace_submodule(base, path, module)
        total = torch.zeros((), dtype=torch.float64)
        count = 0.0
        for reference, output in zip(self.reference, outputs, strict=True):
            if self.has_logits:
                total += (reference.exp() * (reference - output)).sum().double()
                count += reference[..., 0].numel()
            else:
                total += (output - reference).pow(2).sum().double()
                count += float(reference.pow(2).sum())
        return float(total / max(count, 1e-30))


def check_request(
    adapter: HostAdapter, config, spec: AttentionSpec, layers: Sequence[int] | None, targets: Sequence[str] | None
) -> None:
    """Everything about a request that can be checked from the config alone, before any weights load."""
    roles = _resolve_roles(adapter, targets)
    for role in roles:
        spec.validate(*adapter.geometry(config, role))
    if layers is not None:
        count = max(adapter.layer_count(config, role) for role in roles)
        unknown = sorted(set(layers) - set(range(count)))
        if unknown:
            raise SpecError(f"no attention layer(s) {unknown} in this model (it has {count})")
    if getattr(spec, "cache_budget", None) is not None:
        widths = [
            adapter.geometry(config, role)[0]
            for role in roles
            for index in range(adapter.layer_count(config, role))
            if layers is None or index in layers
        ]
        budget_values(spec.cache_budget, widths)


def _resolve_roles(adapter: HostAdapter, targets: Sequence[str] | None) -> tuple[str, ...]:
    if targets is None:
        return adapter.default_roles
    unknown = [target for target in targets if target not in adapter.roles]
    if unknown:
        raise SpecError(f"unknown target(s) {unknown} for {adapter.name}; choose from {', '.join(adapter.roles)}")
    return tuple(targets)


def _float_weights(weights: AttentionWeights) -> AttentionWeights:
    """A float32 CPU copy of the trained tensors (seeding math runs in float64/float32)."""
    changes = {
        f.name: getattr(weights, f.name).detach().to("cpu", torch.float32)
        for f in fields(weights)
        if isinstance(getattr(weights, f.name), torch.Tensor)
    }
    return replace(weights, **changes)


def _layer_report(site: AttentionSite, attention, weights, itemsize: int) -> LayerReport:
    k_map, v_map = effective_kv_weights(attention)
    fixed = attention.fixed_state_values()
    return LayerReport(
        path=site.path,
        role=site.role,
        attention=attention.variant,
        k_weight_error=relative_error(k_map, weights.k_weight.float()),
        v_weight_error=relative_error(v_map, weights.v_weight.float()),
        state_bytes_per_frame_before=mha_state_values(weights.geometry) * itemsize,
        state_bytes_per_frame_after=attention.state_values_per_token() * itemsize,
        fixed_state_bytes_after=fixed * itemsize,
    )


def _capture_site_inputs(model, adapter: HostAdapter, sites, batches) -> dict[str, list]:
    """Run the *original* model on ``batches`` and keep each site's K/V input (for error reports)."""
    batches = list(batches)  # building them may run the model (greedy transcripts): not counted
    captured: dict[str, list] = {site.path: [] for site in sites}

    def record(site, inputs) -> None:
        positions = None if inputs.positions is None else inputs.positions.detach().float().cpu()
        captured[site.path].append((inputs.key_value.detach().float().cpu(), positions))

    observe_sites(model, adapter, sites, batches, record)
    return captured


def _capture_attention_samples(model, adapter: HostAdapter, sites, batches) -> dict[str, list]:
    """Per site, ``(query input, key/value input or None, positions)`` of each calibration call."""
    samples: dict[str, list] = {site.path: [] for site in sites}

    def record(site, inputs) -> None:
        cross = inputs.key_value is not inputs.query
        samples[site.path].append(
            (
                inputs.query.detach().float().cpu(),
                inputs.key_value.detach().float().cpu() if cross else None,
                None if inputs.positions is None else inputs.positions.detach().float().cpu(),
            )
        )

    observe_sites(model, adapter, sites, batches, record)
    return samples


def _reference_attention(weights: AttentionWeights, config, is_causal: bool = False):
    """The original multi-head attention rebuilt from its weights (GQA with every head kept)."""
    reference = build_attention(
        GQALayerSpec(weights.geometry.num_heads),
        weights.geometry,
        weights.position_mode,
        config,
        is_causal=is_causal,
    )
    seed_attention(reference, weights)
    return reference.eval()


@torch.no_grad()
def _activation_errors(attention, weights, inputs, config) -> tuple[float, float]:
    """Relative K and V errors on real layer inputs, against the original projections."""
    reference = _reference_attention(weights, config)
    sums = torch.zeros(4, dtype=torch.float64)
    for states, positions in inputs:
        key, value = attention.key_value(states, positions)
        ref_key, ref_value = reference.key_value(states, positions)
        key = key.repeat_interleave(ref_key.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(ref_value.shape[1] // value.shape[1], dim=1)
        sums += torch.stack(
            [
                (key - ref_key).pow(2).sum(),
                ref_key.pow(2).sum(),
                (value - ref_value).pow(2).sum(),
                ref_value.pow(2).sum(),
            ]
        ).double()
    return float((sums[0] / sums[1]).sqrt()), float((sums[2] / sums[3]).sqrt())

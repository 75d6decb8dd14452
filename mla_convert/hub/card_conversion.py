"""The model card's account of the conversion: the "What was converted" section (how each attention
variant was seeded, the calibration data, the per-layer errors) and the "K/V-state size" section.

Every sentence here states what :mod:`mla_convert.init.seeders` (with :mod:`mla_convert.init`) and
:mod:`mla_convert.surgery` do for the spec recorded in ``config.json``; change them together.
"""

from __future__ import annotations

from pathlib import Path

from ..data import HUB_DATASET
from ..specs import LinearSpec, MLASpec  # their defaults: what an option absent from a stored spec was
from .card_inputs import (
    ATTENTION_NAMES,
    DATASET_NAMES,
    ID_DATASETS,
    NO_KV_ERROR,
    ROLE_NAMES,
    CardInputs,
    conversion,
    host_name,
)


def _fitted(spec: dict) -> bool:
    """Whether the seeding itself is fitted to the calibration audio (calibrated inits, Hedgehog maps)."""
    return spec.get("init") == "calibrated" or spec.get("feature_map") == "hedgehog"


def _latent_size(spec: dict, config: dict) -> str:
    """``a 96-value latent``, or the per-layer sizes a cache budget chose."""
    if spec.get("latent_dim"):
        return f"a {spec['latent_dim']}-value latent"
    sizes = [layer.get("latent_dim") for layer in (conversion(config).get("layers") or {}).values()]
    sizes = [str(size) for size in sizes if size]
    budget = spec.get("cache_budget")
    chosen = f" ({'/'.join(sizes)} values per layer)" if sizes else ""
    return f"a latent sized per layer by a cache budget of {budget} of the original K/V values{chosen}"


def _allocation_text(spec: dict, report: dict | None) -> str:
    """How a cache budget was shared out between the layers (the report's ``budget_search``)."""
    search = (report or {}).get("budget_search") or {}
    if search.get("chosen"):
        return (
            "; the budget was shared out by how far the model's output moved on held-out calibration audio with "
            "each layer alone at candidate sizes (of the measured, uniform and spectral splits, the "
            f"{search['chosen']} one moved it least)"
        )
    if search:
        spectra = "whitened" if spec.get("init") == "calibrated" else "plain"
        return f"; the budget was shared out by the K/V error each layer's {spectra} singular values predict"
    return ""


def _calibrated_mla_text(spec: dict, config: dict) -> str:
    """What :mod:`mla_convert.init.seeders` does for a calibrated MLA spec (whitened joint SVD)."""
    rotary = config.get("position_embeddings_type") == "rotary"
    objective = spec.get("objective", MLASpec.objective)
    if objective == "attention" and not rotary:
        fitted = (
            "the attention objective: each key head weighted by the queries that read it and each value head "
            "by its slice of the output projection, so the latent keeps what reaches the scores and the output"
        )
    elif objective == "attention":
        fitted = "the K/V objective, K and V themselves (the attention objective does not apply to rotary keys)"
    else:
        fitted = "the K/V objective: K and V themselves"
    balanced = spec.get("balance_kv", MLASpec.balance_kv)
    balance = ", K balanced against V (equal energy on the calibration inputs)" if balanced else ""
    damping = spec.get("damping", MLASpec.damping)
    projections = (
        "`W_down = V_rᵀ S⁻¹` from its top right singular vectors, `W_uk = S V_r` (back to the layer input) and "
        "`W_uv = W_v S V_r`"
        if rotary
        else "`W_down = V_rᵀ S⁻¹` from its top right singular vectors, and each up-projection the trained one on "
        "that subspace (`[W_uk; W_uv] = [W_k; W_v] S V_r`)"
    )
    return (
        "seeded by a whitened (activation-calibrated) SVD of the stacked trained `[W_k; W_v]`: the layer inputs of "
        "the calibration audio whiten it (`S`, the Cholesky factor of their second moment `E[x xᵀ]` plus `λI`, "
        f"`λ` = {damping} × its mean diagonal){balance}, fitted with {fitted}; {projections}"
    )


def _calibrated_gqa_text(config: dict) -> str:
    """What :mod:`mla_convert.init.seeders` does for a calibrated GQA spec, by the host's positions."""
    grouping = (
        "heads grouped by how alike their keys and values are on the calibration audio (groups of equal size, "
        "the heads renumbered so each group is contiguous)"
    )
    if config.get("position_embeddings_type") in ("relative", "rotary"):
        return (
            f"{grouping}; each group's K and V projections merged by weighted least squares on the calibration "
            "inputs (keys weighted by the queries that read them, values by the output projection, with a small "
            "ridge toward the plain mean)"
        )
    return (
        f"{grouping}; each group shares one key and one value subspace fitted on the calibration inputs, and each "
        "query head and output-projection slice absorbs its own map into that subspace, so the query and output "
        "projections differ from the base model's (the subspaces weighted like the scores and the output: keys by "
        "the queries that read them, values by the output projection; a one-head group is exact)"
    )


def _linear_text(spec: dict) -> str:
    """Feature map and fixed state of :class:`mla_convert.modeling.attention_linear.LinearAttention`."""
    feature_map = spec.get("feature_map", LinearSpec.feature_map)
    if feature_map == "hedgehog":
        steps = spec.get("transfer_steps", LinearSpec.transfer_steps)
        phi = (
            "Hedgehog's learnable φ(x) = [softmax(x W), softmax(−x W)] (one `d×d` `W` per head, started at the "
            f"identity), fitted by attention transfer: {steps} steps minimising the "
            "cross-entropy between each layer's softmax attention weights and its linear ones on the calibration audio"
        )
        state = "`2d×(d+1)`"  # φ has 2d features
    else:
        phi = "φ(x) = elu(x)+1" if feature_map == "elu" else f"φ(x) = {feature_map}(x)"
        state = "`d×(d+1)`"
    return (
        f"{ATTENTION_NAMES['linear']}: no per-position K/V state, a fixed running sum of {state} values per head "
        f"(`Σ φ(k)vᵀ` and `Σ φ(k)`, `d` the head size); feature map {phi}; the trained query, key, value and "
        "output projections are kept"
    )


def _spec_text(spec: dict, config: dict, report: dict | None = None) -> str:
    kind = spec.get("attention")
    init = spec.get("init")
    if kind == "mla":
        latent = spec.get("latent_dim")
        if init == "svd-split":
            return (
                f"{ATTENTION_NAMES['mla']}: each position stores a {latent}-value latent, split into separate K and "
                f"V latents of {int(latent) // 2} values, each seeded by a truncated SVD of the trained `W_k` / `W_v`"
            )
        seeding = (
            _calibrated_mla_text(spec, config)
            if init == "calibrated"
            else "seeded by a truncated SVD of the stacked trained `[W_k; W_v]` (plain SVD, no calibration)"
        )
        rebuilt = (
            "`V = W_uv c`; keys `K = W_k R(W_uk c)`: the latent mapped back to the layer input, rotated, then the "
            "trained `W_k`"
            if config.get("position_embeddings_type") == "rotary"
            else "`K = W_uk c`, `V = W_uv c`"
        )
        return (
            f"{ATTENTION_NAMES['mla']}: each position stores {_latent_size(spec, config)} `c = W_down x` shared by "
            f"K and V ({rebuilt}), {seeding}{_allocation_text(spec, report)}"
        )
    if kind == "gqa":
        seeding = (
            _calibrated_gqa_text(config)
            if init == "calibrated"
            else "each seeded by the mean of the trained K/V heads of its group of neighbouring heads (mean-pool, "
            "no calibration)"
        )
        return f"{ATTENTION_NAMES['gqa']} with {spec.get('kv_heads')} key/value heads: {seeding}"
    if kind == "linear":
        return _linear_text(spec)
    return f"attention spec `{spec}`"


def _source_text(source: str) -> str:
    if source == "hub":
        return f"LibriSpeech dev-clean streamed from the Hub ([{HUB_DATASET}](https://huggingface.co/datasets/{HUB_DATASET}))"
    name = Path(str(source)).name or str(source)
    return f"a local folder `{name}`"


def _calibration_lines(report: dict, spec: dict) -> list[str]:
    """What the calibration data was and what it was used for: sources and utterance counts (from
    ``conversion_report.json``)."""
    fit = [str(utterance) for utterance in report.get("calibration_ids") or []]
    held_out = [str(utterance) for utterance in report.get("held_out_ids") or []]
    sized = bool((report.get("budget_search") or {}).get("chosen"))  # the measured budget search used them too
    if not fit and not held_out:
        if report.get("calibration_batches"):
            held = report.get("held_out_batches")
            where = f"{held} held-out batches" if held else "the same batches"
            batches = report["calibration_batches"]
            return [f"- **Calibration**: {batches} batches of audio; K/V errors measured on {where}."]
        return []
    reused = held_out == fit  # fewer than five utterances: none could be held out
    counts = []
    everything = fit if reused else fit + held_out
    for pattern, dataset in ID_DATASETS:
        matched = sum(1 for utterance in everything if pattern.match(utterance))
        if matched:
            counts.append(f"{matched} {DATASET_NAMES[dataset]}")
    known = sum(1 for utterance in everything if any(pattern.match(utterance) for pattern, _ in ID_DATASETS))
    if len(everything) > known:
        counts.append(f"{len(everything) - known} other")
    sources = ", ".join(_source_text(source) for source in report.get("calibration_sources") or []) or "unrecorded"
    role = "fitted the conversion" if _fitted(spec) else "were read (this init is not fitted to audio)"
    uses = "the activation errors below" + (" and the per-layer latent sizes" if sized else "")
    if reused:
        split = f"all {len(fit)} {role} and also gave {uses} (too few to hold any out)"
    else:
        split = f"{len(fit)} {role}, {len(held_out)} were held out for {uses}"
    decoder = ""
    if str(report.get("model_type", "")).replace("_", "-") == "whisper":
        decoder = "; decoder inputs were " + (
            "teacher-forced on the reference transcripts"
            if report.get("calibration_text")
            else "the model's own greedy transcripts (label-free)"
        )
    return [
        f"- **Calibration data**: {len(everything)} utterances ({', '.join(counts)}) from {sources}: {split}{decoder}. "
        "None is from a LibriSpeech test split (calibration refuses test-clean and test-other), and "
        "`mla-convert evaluate` refuses to score this model on any utterance listed in its `conversion_report.json`."
    ]


def layer_rows(inputs: CardInputs) -> list[dict]:
    if inputs.report and inputs.report.get("layers"):
        return list(inputs.report["layers"])
    rows = []
    for path, layer in (conversion(inputs.config).get("layers") or {}).items():
        role = "cross" if "encoder_attn" in path else path.split(".", 1)[0]
        rows.append({"path": path, "role": role, "attention": layer.get("attention")})
    return rows


def _fmt_error(value, defined: bool = True) -> str:
    """``n/a`` where a K/V error is not defined (linear attention keeps the trained K/V), ``-`` if unmeasured."""
    if not defined:
        return "n/a"
    return "-" if value is None else f"{float(value):.4f}"


def role_names(rows: list[dict], host: str) -> list[str]:
    roles = list(dict.fromkeys(str(row.get("role", "")) for row in rows))
    if host != "whisper":
        return ["self-attention"]
    return [ROLE_NAMES.get(role, role) for role in roles]


def ratio_text(before: int, after: int) -> str:
    if not before:
        return ""
    if not after:
        return "no per-position state left"
    return f"{100 * after / before:.1f}% of the original, {before / after:.1f}× smaller"


def kv_section(inputs: CardInputs, rows: list[dict]) -> list[str]:
    report = inputs.report or {}
    totals = report.get("totals") or {}
    dtype = report.get("dtype") or inputs.config.get("dtype") or inputs.config.get("torch_dtype") or "float32"
    lines = ["## K/V-state size", ""]
    if not totals:
        totals = _totals_from_config(inputs.config)
    if not totals:
        lines += ["Not recorded (no `conversion_report.json` beside the weights).", ""]
        return lines
    before = int(totals.get("state_bytes_per_frame_before", 0))
    after = int(totals.get("state_bytes_per_frame_after", 0))
    lines += [
        f"Bytes of key/value state each position (an audio frame for encoder self-attention and cross-attention, "
        "a token for decoder self-attention) "
        f"adds to the cache, summed over the {totals.get('converted_layers', len(rows))} converted layers, "
        f"in {dtype} (half of it in float16):",
        "",
        "| attention | before | after | change |",
        "|---|---:|---:|---|",
    ]
    by_role: dict[str, list[int]] = {}
    for row in rows:
        sums = by_role.setdefault(str(row.get("role", "")), [0, 0])
        sums[0] += int(row.get("state_bytes_per_frame_before") or 0)
        sums[1] += int(row.get("state_bytes_per_frame_after") or 0)
    host = host_name(inputs.config, inputs.report)
    if len(by_role) > 1:
        for role, (role_before, role_after) in by_role.items():
            name = ROLE_NAMES.get(role, role) if host == "whisper" else role
            lines.append(f"| {name} | {role_before} B | {role_after} B | {ratio_text(role_before, role_after)} |")
    lines.append(f"| **all converted layers** | {before} B | {after} B | {ratio_text(before, after)} |")
    fixed = int(totals.get("fixed_state_bytes_after") or 0)
    if fixed:
        lines += ["", f"Linear attention keeps instead a fixed {fixed} bytes per sequence (its running sums)."]
    lines.append("")
    return lines


def _totals_from_config(config: dict) -> dict:
    """Without a conversion report: the K/V-state totals of the converted layers (float32), each by
    its variant's formula (:func:`mla_convert.modeling.attention_build.state_values`) at the
    geometry the host adapter reads off the config."""
    layers = conversion(config).get("layers") or {}
    if not layers:
        return {}
    from transformers import AutoConfig

    from ..hosts import adapter_for_config
    from ..modeling.attention_build import state_values

    try:
        host_config = AutoConfig.for_model(**config)
        layout = adapter_for_config(host_config).attention_layout(host_config)
    except Exception:  # a config this toolkit cannot read: no totals rather than wrong ones
        return {}
    if any(path not in layout for path in layers):
        return {}
    geometries = [layout[path][1] for path in layers]
    return {
        "converted_layers": len(layers),
        "state_bytes_per_frame_before": sum(state_values(None, g) for g in geometries) * 4,
        "state_bytes_per_frame_after": sum(state_values(layers[p], layout[p][1]) for p in layers) * 4,
    }


def conversion_section(inputs: CardInputs, rows: list[dict]) -> list[str]:
    info = conversion(inputs.config)
    spec = info.get("spec") or (inputs.report or {}).get("spec") or {}
    report = inputs.report or {}
    host = host_name(inputs.config, inputs.report)
    lines = [
        "## What was converted",
        "",
        f"- **Base model**: {inputs.base.display} ({host}){f', {inputs.base.note}' if inputs.base.note else ''}",
        f"- **Attention**: {_spec_text(spec, inputs.config, report)}.",
        f"- **Spec**: `{_inline(spec)}`",
        f"- **Layers**: {len(rows)} converted ({', '.join(role_names(rows, host))}); "
        "everything else is the base model's.",
        f"- **Converted with**: `{info.get('toolkit', 'mla_convert')}`, weights in {report.get('dtype', 'float32')}.",
    ]
    lines += _calibration_lines(report, spec)
    for note in dict.fromkeys([*(info.get("approximations") or []), *(report.get("approximations") or [])]):
        lines.append(f"- **Approximation**: {note}")
    with_weights = any("k_weight_error" in row for row in rows)
    with_activations = any(row.get("k_activation_error") is not None for row in rows)
    held_out = report.get("held_out_batches") and report.get("held_out_ids") != report.get("calibration_ids")
    audio = "held-out calibration audio" if held_out else "calibration audio"
    lines.append("")
    if with_weights:
        lines.append(
            "Per layer: relative Frobenius error of the effective K and V projections against the original "
            "ones" + (f" (and of K and V on {audio})" if with_activations else "") + ", and K/V-state "
            "bytes per position before and after."
        )
        lines.append("")
        header = ["layer", "role", "attention", "K error", "V error"]
        if with_activations:
            header += ["K error (audio)", "V error (audio)"]
        header += ["bytes before", "bytes after"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * 3 + "---:|" * (len(header) - 3))
        for row in rows:
            defined = row.get("attention") not in NO_KV_ERROR
            cells = [
                f"`{row.get('path')}`",
                str(row.get("role", "")),
                str(row.get("attention", "")),
                _fmt_error(row.get("k_weight_error"), defined),
                _fmt_error(row.get("v_weight_error"), defined),
            ]
            if with_activations:
                cells += [
                    _fmt_error(row.get("k_activation_error"), defined),
                    _fmt_error(row.get("v_activation_error"), defined),
                ]
            cells += [
                str(row.get("state_bytes_per_frame_before", "-")),
                str(row.get("state_bytes_per_frame_after", "-")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    else:
        lines += ["Converted layers: " + ", ".join(f"`{row['path']}`" for row in rows)]
    lines.append("")
    return lines


def _inline(value: dict) -> str:
    return ", ".join(f"{key}={value[key]}" for key in value)

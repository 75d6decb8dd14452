#!/usr/bin/env bash
# Convert -> fine-tune -> evaluate -> compare, in one run.
#
#   ./run_mla_finetuning.sh quick|full|CONFIG.json [MODEL]
#
# quick: 1000 train-clean-100 utterances, sized for a CPU; full: the seeds' GPU recipe on all of
# train-clean-100. The recipe (MLA latent, fine-tuning settings) is configs/<name>.json; MODEL
# overrides its "model". Data: $LIBRISPEECH_ROOT when set (offline), else streamed from the Hub.
# Outputs: runs/<name>-<model>/{converted,finetuned} and results/finetune-<name>-<model>.md/.json.
# Killed half-way? Run the same command again: a finished conversion is kept and fine-tuning
# continues from its last checkpoint (--resume).
set -euo pipefail

usage() { echo "usage: $0 quick|full|CONFIG.json [MODEL]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
case "$1" in
  *.json) config="$1" ;;
  *) config="$here/configs/$1.json" ;;
esac
[[ -f "$config" ]] || { echo "$0: no recipe $config (choose quick, full or a .json file)" >&2; exit 2; }
export SHARED_DATA="${SHARED_DATA:-$(cd "$here/.." && pwd)/shared/data}"

# the recipe as CLI arguments (one per line), environment variables expanded
recipe() {
  python - "$config" "$1" <<'PY'
import json, os, sys
config = json.load(open(sys.argv[1]))
section = config[sys.argv[2]]
if isinstance(section, str):
    print(os.path.expandvars(section)); sys.exit()
for key, value in section.items():
    values = value if isinstance(value, list) else [value]
    if value is True:
        print(f"--{key}")
    elif value is not False:
        print(f"--{key}")
        for item in values:
            print(os.path.expandvars(str(item)))
PY
}

name="$(basename "$config" .json)"
model="${2:-$(recipe model)}"
slug="$(basename "${model#bundled:}" | sed 's/[^A-Za-z0-9._-]/-/g')"
run="runs/$name-$slug"
mapfile -t convert_args < <(recipe convert)
mapfile -t finetune_args < <(recipe finetune)
teacher_args=(--teacher "$model")

echo "== $name: $model -> $run"
# the data first (the training split, the test splits): a recipe whose data is missing fails here in
# seconds, not after the conversion
mla-convert finetune "$model" "${finetune_args[@]}" --output "$run/finetuned" --check-data
if [[ ! -f "$run/converted/config.json" ]]; then
  mla-convert convert "$model" "${convert_args[@]}" --output "$run/converted" --quiet
fi
resume=()
if [[ -f "$run/finetuned/finetune_args.json" ]]; then resume=(--resume); fi
mla-convert finetune "$run/converted" "${teacher_args[@]}" "${finetune_args[@]}" --output "$run/finetuned" "${resume[@]}"
python "$here/scripts/finetune_table.py" "$run/finetuned" --config "$config" --output "results/finetune-$name-$slug.md"

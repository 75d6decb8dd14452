#!/usr/bin/env bash
# Catch the next upstream release before our users do.
#
# Builds a scratch virtualenv, installs torch==2.13.0 (CPU) and then mla_convert[test] WITHOUT
# constraints.txt, so pip picks the newest releases that pyproject.toml allows (or, with --lowest,
# the lowest transformers it declares), prints the versions it got next to the pinned ones, and runs
# the tests that exercise real models and the transformers APIs we depend on (Whisper generation and
# its cache, pipeline(), remote code without mla_convert, the CTranslate2 import, evaluation).
#
#   scripts/check_upstream.sh             # newest allowed releases
#   scripts/check_upstream.sh --lowest    # transformers at the lowest declared version
#   scripts/check_upstream.sh --beyond    # newest releases even past our upper bounds (early warning)
#   KEEP=1 scripts/check_upstream.sh      # keep the scratch env (path printed)
#
# Needs LIBRISPEECH_ROOT (or ../shared/data/LibriSpeech) for the real-audio tests. Exit status is
# pytest's: 0 means the newest (or lowest) releases pass and constraints.txt can be bumped.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-newest}
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore TOKENIZERS_PARALLELISM=false
scratch=$(mktemp -d "${TMPDIR:-/tmp}/mla-upstream.XXXXXX")
[ -n "${KEEP:-}" ] || trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
# shellcheck disable=SC1091
. "$scratch/venv/bin/activate"
pip install -q --no-cache-dir torch==2.13.0
echo "torch==2.13.0" > "$scratch/torch-only.txt"
case "$mode" in
  newest|"") pip install -q --no-cache-dir --upgrade -c "$scratch/torch-only.txt" -e ".[test]" ;;
  --lowest)
    lowest=$(python3 - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
spec = next(d for d in deps if re.match(r"transformers\b", d))
print(re.search(r">=\s*([0-9][^,\s]*)", spec).group(1))
PY
)
    pip install -q --no-cache-dir -c "$scratch/torch-only.txt" -e ".[test]" "transformers==$lowest" ;;
  --beyond)
    pip install -q --no-cache-dir -c "$scratch/torch-only.txt" -e ".[test]"
    pip install -q --no-cache-dir --upgrade -c "$scratch/torch-only.txt" transformers datasets accelerate \
      huggingface_hub safetensors tokenizers ;;
  *) echo "usage: $0 [--lowest|--beyond]" >&2; exit 2 ;;
esac
echo "== versions installed ($mode) vs constraints.txt"
python3 - <<'PY'
import importlib.metadata as md, re
for line in open("constraints.txt"):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, pinned = re.split(r"==", line)
    try:
        got = md.version(name)
    except md.PackageNotFoundError:
        got = "not installed"
    mark = "" if got == pinned else "   <-- differs"
    print(f"{name:24} pinned {pinned:12} got {got}{mark}")
PY
echo "== real-model and API tests"
python -m pytest -q -p no:cacheprovider \
  tests/test_whisper_generation.py tests/test_whisper_pipeline.py tests/test_whisper_host.py \
  tests/test_whisper_real.py tests/test_reload.py tests/test_exactness.py tests/test_ct2_import.py \
  tests/test_evaluate.py
[ -z "${KEEP:-}" ] || echo "scratch env kept at $scratch"

#!/usr/bin/env bash
# The ESPnet environment scripts/check_espnet.py compares against (kept out of CI: ESPnet is heavy).
#
#   scripts/espnet_env.sh [VENV]      # default: ../venv-espnet beside the checkout
#
# ESPnet 202511 pins versions that do not install beside torch 2.13 (and there is no CPU torchaudio
# for it), so it is installed without its dependencies, then with the few modules its ASR encoders,
# front end and CTC import. Only the model classes are used (no ASRTask, which imports every
# encoder); torchaudio is stubbed by check_espnet.py, which never calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-../venv-espnet}
wheel=${TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1)}
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "${wheel:-torch==2.13.0}"
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps espnet==202511
"$venv/bin/pip" install -q --disable-pip-version-check configargparse typeguard humanfriendly scipy librosa \
  PyYAML torch_complex packaging filelock soundfile einops "numpy>=2"
"$venv/bin/python" -c "import espnet; print('ESPnet', espnet.__version__, 'in $venv')"

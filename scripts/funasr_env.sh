#!/usr/bin/env bash
# The FunASR environment for the Paraformer equivalence check of issue 16 (kept out of CI).
#
#   scripts/funasr_env.sh [VENV]      # default: ../venv-funasr beside the checkout
#
# FunASR 1.4.16 is installed without its dependencies (it pins packages that do not install beside
# torch 2.13, and there is no CPU torchaudio for it), then with the modules that importing
# funasr.models.paraformer needs. torchaudio is stubbed by the scripts that use this env.
# Checked on 2026-12-02: `Paraformer(encoder="SANMEncoder", decoder="ParaformerSANMDecoder",
# predictor="CifPredictorV2", ...)` builds; its state dict uses encoder.encoders0/encoders.N
# .self_attn.{linear_q_k_v,fsmn_block,linear_out}, decoder.decoders.N.{self_attn.fsmn_block,
# src_attn.{linear_q,linear_k_v,linear_out}}, decoder.decoders3, predictor.{cif_conv1d,cif_output}.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-../venv-funasr}
wheel=${TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1)}
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "${wheel:-torch==2.13.0}"
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps funasr==1.4.16
"$venv/bin/pip" install -q --disable-pip-version-check PyYAML numpy scipy kaldiio jieba hydra-core omegaconf \
  sentencepiece tqdm librosa soundfile jaconv editdistance torch_complex rapidfuzz six
"$venv/bin/python" -c "
import sys, types
sys.modules.setdefault('torchaudio', types.ModuleType('torchaudio'))
import funasr
from funasr.models.paraformer.model import Paraformer
print('FunASR', funasr.__version__, 'in $venv')"

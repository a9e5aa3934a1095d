#!/usr/bin/env bash
# The GPU path, ready to prove: bench/gpu.py (its docstring says what it measures) on a lent CUDA
# machine in under 8 minutes, with nothing installed by hand.
#
#   bench/gpu.sh                 CUDA: the four models on a 200 x 512² CT, the table to paste
#   bench/gpu.sh --tiny          CPU, tiny CT and models: proves the script (tests run it)
#   bench/gpu.sh --mirroring     also test-time mirroring for the five nnU-Net folds (slower)
#
# Python: $PYTHON, else .venv/bin/python, else python3. Where that Python cannot import the
# node with its nnU-Net and MONAI extras, the script does the repository's own install first,
# into .venv-gpu, a venv that sees the machine's packages: its torch (a CUDA build) stays, since
# pyproject's torch pin names the CPU wheel of CI. On a machine without a package index give
# WHEELS=DIR, a folder of the missing wheels (made where pip works, for the GPU machine's Python:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d DIR <deps>).
set -euo pipefail
cd "$(dirname "$0")/.."

py=${PYTHON:-}
if [[ -z $py ]]; then
    if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi

if ! "$py" -c 'import ie_gateway.service, nnunetv2, monai.bundle, torch' 2>/dev/null; then
    echo "bench/gpu.sh: installing the repository into .venv-gpu (torch as the machine has it)" >&2
    "$py" -m venv --system-site-packages .venv-gpu
    py=.venv-gpu/bin/python
    # pyproject's dependencies and the nnunet and monai extras, all but torch
    mapfile -t deps < <("$py" - <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
for dep in [*project["dependencies"], *extras["nnunet"], *extras["monai"]]:
    if not re.match(r"torch\b(?![-_])", dep):
        print(dep)
PY
)
    index=()
    if [[ -n ${WHEELS:-} ]]; then index=(--no-index --find-links "$WHEELS"); fi
    "$py" -m pip install -q --disable-pip-version-check "${index[@]}" "${deps[@]}"
    "$py" -m pip install -q --disable-pip-version-check --no-deps -e .
fi

export PYTHONUNBUFFERED=1
exec "$py" bench/gpu.py "$@"

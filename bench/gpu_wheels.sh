#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels that ren needs and the GPU machines lack (Python 3.12, manylinux
# x86_64), at constraints.txt's versions; bench/gpu_check.sh installs them there into /tmp/site. Run where pip
# reaches PyPI, from any directory; the list and why each is carried: bench/gpu_wheels.py. Uses $PYTHON, else
# the repo's .venv, else python3 (any Python with pip: the files are chosen for 3.12, not for it).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-}"
[ -n "$PY" ] || { [ -x "$REPO/.venv/bin/python" ] && PY="$REPO/.venv/bin/python"; } || PY=python3
exec "$PY" "$REPO/bench/gpu_wheels.py" download

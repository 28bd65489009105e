#!/usr/bin/env bash
# Set up, then run the default test suite (the slow tests are .ci/run's second step).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"

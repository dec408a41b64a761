#!/usr/bin/env bash
# Set up (idempotent), then run the whole test suite: lint, types, unit tests, lab tests.
# Run as root on Debian 12. Extra arguments go to pytest (e.g. -k smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check netsvc tests topologies scripts bench
echo "== mypy --strict netsvc"
.venv/bin/mypy --strict netsvc
echo "== pytest (unit and lab)"
.venv/bin/pytest -q -p no:cacheprovider tests "$@"

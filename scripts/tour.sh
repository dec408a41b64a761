#!/usr/bin/env bash
# Set up (idempotent), then run the default lab scenario, the tour, and print where its report is.
# Run as root on Debian 12. Extra arguments go to `netsvc lab` (e.g. --hosts 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/netsvc lab --scenario smoke --report reports/smoke "$@"

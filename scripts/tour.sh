#!/usr/bin/env bash
# Set up (idempotent), then run the lab tour: each scenario in turn, reports in reports/NAME/.
# Run as root on Debian 12. Extra arguments go to every `netsvc lab` run (e.g. --hosts 4).
# Later services add their scenario to TOUR.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
TOUR=(smoke ip-conflict vmnet-failure peripheral)
status=0
for scenario in "${TOUR[@]}"; do
  echo "== netsvc lab --scenario $scenario"
  .venv/bin/netsvc lab --scenario "$scenario" --report "reports/$scenario" "$@" || status=1
done
exit "$status"

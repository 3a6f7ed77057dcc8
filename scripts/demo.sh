#!/usr/bin/env bash
# One command: set everything up and run the end-to-end demo on the embedded defaults.
# Outputs go to ./demo-output; MLflow tracking to ./mlflow.db (SQLite) unless MLFLOW_TRACKING_URI is set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MLFLOW_DISABLE_TELEMETRY=true
exec .venv/bin/blinaprofile demo --out demo-output "$@"

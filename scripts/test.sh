#!/usr/bin/env bash
# One command: set everything up and run the test suite (what .ci/run runs).
# As root with apt-get available it also installs the Debian packages some tests use
# (chromium for the report rendering and print tests, poppler-utils to read the printed
# pages, postgresql for the tracking-server test);
# without them those tests skip with a reason.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && [ "${BLINAPROFILE_SKIP_APT:-0}" != 1 ]; then
  need=()
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
  command -v pdfinfo >/dev/null 2>&1 || need+=(poppler-utils)
  if [ ${#need[@]} -gt 0 ]; then
    echo "test: installing Debian packages: ${need[*]}" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null) \
      || echo "test: could not install ${need[*]}; dependent tests will skip" >&2
  fi
fi
export MLFLOW_DISABLE_TELEMETRY=true
exec .venv/bin/python -m pytest "$@"

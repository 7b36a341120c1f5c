#!/usr/bin/env bash
# Install (idempotent), then run the offline demo on the embedded SmolLM2-135M-Instruct. Extra flags go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/trl-selfdistill demo "$@"

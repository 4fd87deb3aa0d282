#!/usr/bin/env bash
# The README's evidence section, measured on the default model (SmolLM2-135M) with 3 seeds: every command of
# `tunegap analyze` / `sweep` / `experiment`, in the order the evidence is worth per CPU hour. Each command writes
# evidence/<name>/ (results.json, section.json, charts) and reuses finished runs in $RUNS, so a killed script
# resumes where it stopped; wall times (measured) are appended to evidence/walltimes.tsv.
#   bash evidence/run.sh            # everything (many hours on 2 CPU cores)
#   bash evidence/run.sh gap-docstrings sweep-lr-docstrings   # some of it
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
TUNEGAP=${TUNEGAP:-.venv/bin/tunegap}
RUNS=${RUNS:-evidence/runs}
SEEDS=${SEEDS:-3}

declare -A COMMANDS=(
  [gap-docstrings]="experiment gap --task docstrings --seeds $SEEDS --lr-factors 0.3,1,3 --out evidence/gap-docstrings"
  [gap-support]="experiment gap --task support --seeds $SEEDS --lr-factors 0.3,1,3 --out evidence/gap-support"
  [probe]="analyze probe --seeds $SEEDS --out evidence/probe"
  [sweep-lr-docstrings]="sweep lr --task docstrings --seeds $SEEDS --out evidence/sweep-lr-docstrings --runs-dir $RUNS"
  [convergence]="analyze convergence --seeds $SEEDS --out evidence/convergence --runs-dir $RUNS"
  [knowledge]="analyze knowledge --seeds $SEEDS --out evidence/knowledge --runs-dir $RUNS"
  [sweep-lora-rank]="sweep lora-rank --task both --seeds $SEEDS --ranks 4,16,64 --out evidence/sweep-lora-rank --runs-dir $RUNS"
  [sweep-freeze]="sweep freeze --task both --seeds $SEEDS --out evidence/sweep-freeze --runs-dir $RUNS"
  [sweep-noise]="sweep noise --task both --seeds $SEEDS --out evidence/sweep-noise --runs-dir $RUNS"
  [plane]="analyze plane --task both --seeds $SEEDS --out evidence/plane --runs-dir $RUNS"
  [rank]="analyze rank --steps-list 12,24 --lrs 5e-5,2e-4 --seeds $SEEDS --out evidence/rank --runs-dir $RUNS"
  [sweep-lr-support]="sweep lr --task support --seeds $SEEDS --out evidence/sweep-lr-support --runs-dir $RUNS"
)
ORDER=(gap-docstrings gap-support probe sweep-lr-docstrings convergence knowledge sweep-lora-rank sweep-freeze
       sweep-noise plane rank sweep-lr-support)

for name in "${@:-${ORDER[@]}}"; do
  [[ -n "${COMMANDS[$name]:-}" ]] || { echo "evidence/run.sh: unknown step '$name' (one of: ${ORDER[*]})" >&2; exit 2; }
  started=$(date +%s)
  $TUNEGAP ${COMMANDS[$name]} --no-progress
  printf '%s\t%s\t%s s\t%s\n' "$(date -u +%FT%TZ)" "$name" "$(( $(date +%s) - started ))" "$(nproc) cores" \
    >> evidence/walltimes.tsv
  # finished runs need no resume point: their checkpoints (about 1.6 GB per full fine-tune) go, weights stay
  find evidence -type d -name checkpoints -prune -exec rm -rf {} +
done
$TUNEGAP report evidence

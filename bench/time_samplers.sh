#!/usr/bin/env bash
# The time-sampler experiment of the README (issue 17): digits, 4000 steps, STMD and Mean Flow
# under each (r, t) and s sampler, FD at NFE 1, 2, 4; then the gmm exact-kernel grid.
# Usage: bench/time_samplers.sh [SEED] [SETTING...]   (settings: A B C D Dq E F G H J L P Q Q128 R Rmf S T T1 U V W ddpm; default A B C D F)
#        bench/time_samplers.sh gmm[SEED] [SETTING...] (the gmm preset: STMD per setting, then the kernel grid;
#                                                       gmm is seed 0, gmm1 seed 1, ...)
# Runs go to runs/samplers/<setting>-<method>-seed<SEED>, evaluations to runs/samplers/eval-<setting>-seed<SEED>
# (and STMD's per-s draws, evaluate conditional, to runs/samplers/cond-<setting>-seed<SEED>).
# Each run is evaluated on its own --sample-grid; Dq is D's runs evaluated on the quadratic grid; ddpm
# is DDPM trained under F, evaluated on both grids.
set -euo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0
fi
seed=${1:-0}; shift || true
settings=${*:-A B C D F}
if [[ ! "$seed" =~ ^([0-9]+|gmm[0-9]*)$ ]]; then
  echo "error: SEED $seed: give a number or gmm[SEED] first (bench/time_samplers.sh --help)" >&2; exit 2
fi
mixture="--time-sampler mixture --mixture-weight 0.5 --r-mean -4 --r-std 1.6 --adaptive-p 0.75"
declare -A FLAGS=(
  [A]="--time-sampler pair --time-mean -0.4 --time-std 1.0 --flow-matching-fraction 0.75 --adaptive-p 1.0 --s-sampler uniform --sample-grid uniform"
  [B]="--time-sampler separate --time-mean -0.6 --time-std 1.6 --r-mean -4 --r-std 1.6 --flow-matching-fraction 0.25 --adaptive-p 0.75 --s-sampler uniform --sample-grid uniform"
  [C]="$mixture --time-mean -0.6 --time-std 1.6 --flow-matching-fraction 0.5 --s-sampler uniform --sample-grid uniform"
  [D]="$mixture --time-mean -0.6 --time-std 1.6 --flow-matching-fraction 0.5 --s-sampler grid --sample-grid uniform"
  [E]="$mixture --time-mean -0.6 --time-std 1.6 --flow-matching-fraction 0.5 --s-sampler grid --sample-grid quadratic"
  [F]="$mixture --time-mean -0.4 --time-std 1.0 --flow-matching-fraction 0.5 --s-sampler grid --sample-grid quadratic"
  [G]="$mixture --time-mean -0.6 --time-std 1.6 --flow-matching-fraction 0.75"
  [H]="$mixture --time-mean -0.6 --time-std 1.6 --flow-matching-fraction 0.5 --s-sampler grid --sample-grid quadratic --s-grid-fraction 0.75 --s-grid-steps 1 2 4"
  [L]="$mixture --time-mean -0.4 --time-std 1.0 --flow-matching-fraction 0.5 --s-sampler grid --sample-grid quadratic --steps 12000"
  [P]="$mixture --time-mean -0.4 --time-std 1.0 --flow-matching-fraction 0.5 --s-sampler grid --sample-grid quadratic --adaptive-p 0.5"
  [Q]="$mixture --time-mean -0.4 --time-std 1.0 --flow-matching-fraction 0.5 --s-sampler grid --sample-grid quadratic --adaptive-p 0.25"
  [R]="$mixture --time-mean -0.4 --time-std 1.0 --flow-matching-fraction 0.5 --s-sampler grid --sample-grid quadratic --adaptive-p 0"
  [S]="$mixture --time-mean -0.4 --time-std 1.0 --flow-matching-fraction 0.5 --s-sampler grid --sample-grid quadratic --adaptive-p 0.25 --s-grid-steps 4"
  [J]="$mixture --time-mean -0.4 --time-std 1.0 --flow-matching-fraction 0.5 --s-sampler grid --sample-grid quadratic --adaptive-p 0.25 --s-grid-fraction 0.75 --s-grid-steps 1 2 4"
  [T]="$mixture --time-mean -0.4 --time-std 1.0 --flow-matching-fraction 0.5 --s-sampler grid --sample-grid quadratic --adaptive-p 0.25 --flow-grid-fraction 0.25"
  [T1]="$mixture --time-mean -0.4 --time-std 1.0 --flow-matching-fraction 0.5 --s-sampler grid --sample-grid quadratic --adaptive-p 0.25 --flow-grid-fraction 0.1 --flow-grid-steps 1"
  [U]="$mixture --time-mean -0.4 --time-std 1.0 --flow-matching-fraction 0.5 --s-sampler grid --sample-grid quadratic --adaptive-p 0.25 --flow-grid-fraction 0.5"
  [V]="$mixture --time-mean -0.4 --time-std 1.0 --flow-matching-fraction 0.5 --s-sampler grid --sample-grid quadratic --ema-decays 0.9995 0.9998"
  [W]="$mixture --time-mean -0.4 --time-std 1.0 --flow-matching-fraction 0.5 --s-sampler grid --sample-grid quadratic --unet S"
)
FLAGS[Rmf]=${FLAGS[R]}
FLAGS[Q128]="${FLAGS[Q]} --batch-size 128"
# The s law only matters to STMD (Mean Flow's D, E, H are its C); G is Mean Flow's alone; L is F trained 3x longer;
# P is F with p = 0.5, Q with p = 0.25, R with p = 0 (the plain squared error), Rmf R for Mean Flow alone (its best setting);
# Q128 is Q with twice the batch (128), the same 4000 steps;
# J is Q with H's s law (s = 1 on 44% of the rows, Q 23%); T and U are Q with a quarter and half of the rows' (r, t) on the sampler's flow grids (M = 1, 2, 4); T1 is Q with
# the one-step pair (0, 1) alone on a tenth of the rows;
# S is Q drawing its grid s from the 4-step grid alone (each of its points 1/4, where Q gives s = 1 0.47); V is F keeping two longer EMAs beside its 0.999, each
# evaluated; W is F on a 5x larger network (--unet S: 1.0M
# parameters against the preset's 0.2M).
declare -A METHODS=([A]="stmd meanflow" [B]="stmd meanflow" [C]="stmd meanflow" [D]=stmd [E]=stmd [H]=stmd
                    [F]="stmd meanflow" [G]=meanflow [L]="stmd meanflow" [P]="stmd meanflow" [Q]="stmd meanflow" [Q128]="stmd meanflow" [R]="stmd meanflow" [Rmf]=meanflow [S]=stmd [J]=stmd [T]="stmd meanflow" [T1]="stmd meanflow" [U]="stmd meanflow" [V]=stmd [W]="stmd meanflow")
for x in $settings; do  # all checked before the first run: a typo would fail hours in
  if [[ -z "${FLAGS[$x]+set}" && ( "$seed" == gmm* || ( "$x" != ddpm && "$x" != Dq ) ) ]]; then
    known=$(printf '%s\n' "${!FLAGS[@]}" | sort | tr '\n' ' ')
    echo "error: setting $x: not one of ${known}$([[ "$seed" == gmm* ]] || echo "Dq ddpm ")(bench/time_samplers.sh --help)" >&2
    exit 2
  fi
done
python -c "import stmd_fast" 2>/dev/null || {
  echo "error: python cannot import stmd_fast: run this from the repository after pip install -e ." >&2; exit 2; }
root=runs/samplers
train() {  # train SETTING METHOD OUT [more flags]: once (a finished run leaves OUT/done)
  local x=$1 method=$2 out=$3; shift 3
  [ -f "$out/done" ] || { python -m stmd_fast.train --method $method ${FLAGS[$x]} --out $out "$@" && touch "$out/done"; }
}
swept() {  # swept OUT: its sweep finished (an interrupted one is run again: it measures only what it lacks)
  grep -q '"complete": true' "$1/results.json" 2>/dev/null
}
if [[ "$seed" == gmm* ]]; then
  gmm_seed=${seed#gmm}; suffix=${gmm_seed:+-seed$gmm_seed}  # seed 0 keeps the first runs' names
  runs=()
  for x in $settings; do
    train $x stmd $root/gmm-$x-stmd$suffix --preset gmm --seed ${gmm_seed:-0}
    runs+=("$root/gmm-$x-stmd$suffix")
  done
  python -m stmd_fast.evaluate kernel "${runs[@]}" --flow-steps 1 --out $root/eval-gmm-$(echo $settings | tr -d ' ')$suffix
  exit
fi
for x in $settings; do
  if [ "$x" = ddpm ]; then  # DDPM under F: its uniform and quadratic grids side by side
    train F ddpm $root/F-ddpm-seed$seed --compile --seed $seed --sample-every 0
    for grid in uniform quadratic; do
      swept $root/eval-ddpm-$grid-seed$seed || python -m stmd_fast.evaluate sweep $root/F-ddpm-seed$seed \
        --grid $grid --ddpm-steps 1,2,4,8,16,50 --out $root/eval-ddpm-$grid-seed$seed
    done
    continue
  fi
  if [ "$x" = Dq ]; then
    train D stmd $root/D-stmd-seed$seed --compile --seed $seed --sample-every 0
    swept $root/eval-Dq-seed$seed || python -m stmd_fast.evaluate sweep $root/D-stmd-seed$seed \
      --grid quadratic --stmd 1x1,2x1,1x2,4x1,2x2 --out $root/eval-Dq-seed$seed
    continue
  fi
  if [ "$x" = V ]; then  # one run, each of its EMAs swept: does a longer average steady STMD's seeds?
    train V stmd $root/V-stmd-seed$seed --compile --seed $seed --sample-every 0
    for ema in 0.999 0.9995 0.9998; do
      swept $root/eval-V-ema$ema-seed$seed || python -m stmd_fast.evaluate sweep $root/V-stmd-seed$seed \
        --ema $ema --stmd 1x1,2x1,1x2,4x1,2x2 --out $root/eval-V-ema$ema-seed$seed
    done
    continue
  fi
  runs=()
  for method in ${METHODS[$x]}; do
    train $x $method $root/$x-$method-seed$seed --compile --seed $seed --sample-every 0
    runs+=("$root/$x-$method-seed$seed")
  done
  swept $root/eval-$x-seed$seed || python -m stmd_fast.evaluate sweep "${runs[@]}" --stmd 1x1,2x1,1x2,4x1,2x2 \
    --meanflow-steps 1,2,4 --out $root/eval-$x-seed$seed
  # STMD's draws of p(x_0 | x_s) from real x_s at each point of its 4-step grid: which steps limit its chains
  [[ " ${METHODS[$x]} " != *" stmd "* || -f $root/cond-$x-seed$seed/conditional.json ]] || \
    python -m stmd_fast.evaluate conditional $root/$x-stmd-seed$seed --out $root/cond-$x-seed$seed
done

#!/usr/bin/env bash
# The time-sampler experiment of the README (issue 17): digits, 4000 steps, STMD and Mean Flow
# under each (r, t) sampler, FD at NFE 1, 2, 4; then the gmm exact-kernel grid.
# Usage: bench/time_samplers.sh [SEED] [SAMPLER...]   (samplers: A B C D; default all)
#        bench/time_samplers.sh gmm [SAMPLER...]      (the gmm preset: STMD per sampler, then the kernel grid)
# Runs go to runs/samplers/<sampler>-<method>-seed<SEED>, evaluations to runs/samplers/eval-<sampler>-seed<SEED>.
set -euo pipefail
seed=${1:-0}; shift || true
samplers=${*:-A B C D}
declare -A FLAGS=(
  [A]="--time-sampler pair --time-mean -0.4 --time-std 1.0 --flow-matching-fraction 0.75 --adaptive-p 1.0 --s-sampler uniform"
  [B]="--time-sampler separate --time-mean -0.6 --time-std 1.6 --r-mean -4 --r-std 1.6 --flow-matching-fraction 0.25 --adaptive-p 0.75 --s-sampler uniform"
  [C]="--time-sampler mixture --mixture-weight 0.5 --time-mean -0.6 --time-std 1.6 --r-mean -4 --r-std 1.6 --flow-matching-fraction 0.5 --adaptive-p 0.75 --s-sampler uniform"
  [D]="--time-sampler mixture --mixture-weight 0.5 --time-mean -0.6 --time-std 1.6 --r-mean -4 --r-std 1.6 --flow-matching-fraction 0.5 --adaptive-p 0.75 --s-sampler grid"
)
root=runs/samplers
if [ "$seed" = gmm ]; then
  runs=()
  for x in $samplers; do
    out=$root/gmm-$x-stmd
    [ -f "$out/done" ] || { python -m stmd_fast.train --preset gmm ${FLAGS[$x]} --out $out && touch "$out/done"; }
    runs+=("$out")
  done
  python -m stmd_fast.evaluate kernel "${runs[@]}" --flow-steps 1 --out $root/eval-gmm-$(echo $samplers | tr -d ' ')
  exit
fi
[ -d runs/classifier-digits ] || python -m stmd_fast.evaluate train-classifier --preset digits
for x in $samplers; do
  runs=()
  for method in stmd meanflow; do
    [ "$x" = D ] && [ "$method" = meanflow ] && continue  # the s law only matters to STMD
    out=$root/$x-$method-seed$seed
    [ -f "$out/done" ] || { python -m stmd_fast.train --method $method --compile --seed $seed ${FLAGS[$x]} --out $out --sample-every 0 && touch "$out/done"; }
    runs+=("$out")
  done
  [ -f $root/eval-$x-seed$seed/results.json ] || python -m stmd_fast.evaluate sweep "${runs[@]}" --stmd 1x1,2x1,1x2,4x1,2x2 \
    --meanflow-steps 1,2,4 --out $root/eval-$x-seed$seed
done

#!/usr/bin/env bash
# The whole benchmark suite in one command; every script merges its results into
# bench/results/<device>-<date>.json. Meant for a GPU (about 10 minutes on one; the compiles
# are most of it). On a CPU it runs too, slowly, without the Triton rows.
set -euo pipefail
cd "$(dirname "$0")/.."
python bench/kernels.py
python bench/train_step.py --preset cifar10 --method stmd
python bench/train_step.py --preset cifar10 --method meanflow --variants "eager fp32,compiled bf16 + triton"
python bench/train_step.py --preset mnist --method stmd
python bench/sample.py --preset cifar10 --method stmd
python bench/train_step.py --preset celeba-latent --method stmd --variants "eager fp32,compiled bf16,compiled bf16 + triton"

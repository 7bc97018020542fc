#!/usr/bin/env bash
# Grown-phase schedule check on the validation split: one members checkpoint (seed 0 of the
# ablation), mixture vs random growth, grown lr and epochs.
cd "$(dirname "$0")/.."
# Needs the members checkpoint of `bench/reproduce.py --ablation coefs` (seed 0).
# Usage: bash bench/schedule_check.sh > bench/results/schedule_check.csv
M=bench/results/ablation-runs/ablation-seed0/members/members.pt
D=bench/results/schedule-runs; mkdir -p $D
echo "method,lr,epochs,val_top1"
for cfg in "0.005 3" "0.02 3" "0.05 3" "0.02 6"; do
  set -- $cfg
  for method in mixture random; do
    out=$D/$method-$1-$2.pt
    .venv/bin/mg grow $M --to wide --method $method --out $out --force >/dev/null 2>>$D/log
    .venv/bin/mg train --resume $out --set grow.wide.lr=$1 --set grow.wide.epochs=$2 >/dev/null 2>>$D/log
    v=$(.venv/bin/python -c "import torch; print(torch.load('$out', weights_only=True)['history'][-1]['val_top1'])")
    echo "$method,$1,$2,$v"
  done
done

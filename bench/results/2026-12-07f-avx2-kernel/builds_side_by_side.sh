#!/bin/bash
# Alternates two yuanmoe binaries (A, B) on `bench --step-only` of tiny-m32, N rounds, from the
# repository root; prints each round's median step and MFU and the ratio A/B.
N=$1; A=$2; B=$3
for r in $(seq 1 $N); do
  for which in A B; do
    bin=${!which}
    $bin bench --config configs/tiny-m32.json --step-only --steps 3 --warmup 1 --json /tmp/ab_$which.json >/dev/null 2>&1
  done
  python3 -c "
import json;a=json.load(open('/tmp/ab_A.json'));b=json.load(open('/tmp/ab_B.json'))
print('round $r: A %.1f ms mfu %.1f%% | B %.1f ms mfu %.1f%% | A/B %.3f'%(a['median_step_seconds']*1e3,a['mfu']*100,b['median_step_seconds']*1e3,b['mfu']*100,a['median_step_seconds']/b['median_step_seconds']))"
done

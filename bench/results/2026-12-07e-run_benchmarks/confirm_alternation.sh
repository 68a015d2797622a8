#!/bin/bash
# The ours/eager alternation of bench/run_benchmarks.py (section 2) alone, N rounds, run from the
# repository root; prints each round's step medians, MFU and ratio.
N=${1:-3}; BIN=${2:-build/yuanmoe}
PY=/root/.local/share/yuanmoe/venv/bin/python3
for r in $(seq 1 $N); do
  $BIN bench --config configs/tiny-m32.json --step-only --steps 3 --warmup 1 --json /tmp/o_$r.json >/dev/null 2>&1
  MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 $PY bench/pytorch_eager_step.py --config configs/tiny-m32.json --steps 3 --warmup 1 --threads 2 --json /tmp/e_$r.json >/dev/null 2>&1
  python3 -c "
import json;o=json.load(open('/tmp/o_$r.json'));e=json.load(open('/tmp/e_$r.json'))
print('ours %.1f ms (%s) mfu %.1f%% peak %.1f | eager %.1f ms | ratio %.2f'%(o['median_step_seconds']*1e3,[round(x*1e3) for x in o['step_seconds']],o['mfu']*100,o['measured_peak_flops']/1e9,e['median_step_seconds']*1e3,e['median_step_seconds']/o['median_step_seconds']))"
done

#!/bin/bash
# One run: attention kernels alone (alternating, 2 rounds), then 1.13 vs 2.11 step (alternating, 3 rounds).
cd /work/main
NEW=build/yuanmoe; OLD=/tmp/yuanmoe-113/build/yuanmoe
for S in 256 1024 4096 16384; do
  rep=7; [ $S -gt 4096 ] && rep=2
  for r in 0 1; do for k in sdpa blockwise materialised; do
    [ $k = materialised ] && [ $S -gt 4096 ] && continue
    $NEW bench --config configs/tiny-m32.json --attention-kernel $k --repeats $rep --set train.seq_length=$S --set model.max_seq_length=$S --set train.micro_batch_size=1 --json /tmp/meas/att_${S}_${k}_${r}.json > /dev/null
  done; done
done
for r in 0 1 2; do
  $OLD bench --config configs/tiny-m32.json --step-only --steps 3 --warmup 1 --json /tmp/meas/cmp_old_$r.json > /dev/null
  $NEW bench --config configs/tiny-m32.json --step-only --steps 3 --warmup 1 --json /tmp/meas/cmp_new_$r.json > /dev/null
done
echo done > /tmp/meas/done

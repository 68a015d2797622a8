#!/bin/bash
# usage: run.sh BINARY OUTDIR — 20 steps of tiny-m32: one process, dp=2, pp=2
set -e
bin=$1; out=$2; mkdir -p $out
common="--set train.max_steps=20 --set checkpoint.interval=10 --set log.interval=1 --set log.plots=false --set log.progress=false"
$bin train --config configs/tiny-m32.json --run-dir $out/one $common > $out/one.log 2>&1
$bin launch --nproc 2 -- train --config configs/tiny-m32.json --run-dir $out/dp2 $common > $out/dp2.log 2>&1 &
pid=$!
for i in $(seq 1 40); do sleep 0.5; ss -ltnp 2>/dev/null | grep yuanmoe > $out/ss.txt && [ -s $out/ss.txt ] && break; done
wait $pid
$bin launch --nproc 2 -- train --config configs/tiny-m32-pp2.json --run-dir $out/pp2 $common > $out/pp2.log 2>&1
echo done > $out/done

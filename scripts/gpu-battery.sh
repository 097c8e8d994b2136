#!/usr/bin/env bash
# What one call to the GPU machine checks and measures, in order of importance, each step under a
# timeout so that the call ends within BUDGET seconds (default 590) and keeps what it has:
#   1. the GPU suite (scripts/gpu-suite.ts): parity, training, resume, generation, vocabulary blocks;
#   2. bench-gpu distill-step in fp32 and mixed precision (whole logits, and with the LM head in
#      chunks), then PyTorch fp32, tf32 and bf16 autocast on the same machine
#      (../shared/bench/ref_distill_bench_gpu.py), back to back;
#   3. the kernels' time of one mixed step (bench --case profile) and matmul TFLOP/s in fp32 and on the
#      tensor cores under two tilings (bench --case matmul);
#   4. forward and decode, the serving bench, every command (scripts/every-command.sh).
# Logs and JSON lines go to $OUT (what the device tool brings back).
#
#   ../shared/gpu/prepare.sh scripts/gpu.ts && xz -T0 -6 -f .gpu/app.mjs     (here; the tree must travel under 64 MiB)
#   cp -r ../shared/fixtures/tiny-mistral ../shared/bench/ref_distill_bench_gpu.py .gpu/
#   bash scripts/gpu-battery.sh [BUDGET]                                         (there, with .gpu carried)
set -u
budget=${1:-590}
out=${OUT:-/tmp/gpu-battery}
mkdir -p "$out"
start=$(date +%s)
left() { echo $((budget - ($(date +%s) - start))); }
# within SECONDS 'COMMAND': runs the command line (functions below included) with at most SECONDS, fewer if the budget has less left.
within() {
  local rest=$(left)
  [ "$rest" -le 5 ] && { echo "(skipped, budget spent: $2)"; return 124; }
  timeout $(($1 < rest ? $1 : rest)) bash -c "$2"
}
[ -f .gpu/app.mjs ] || xz -dc .gpu/app.mjs.xz > .gpu/app.mjs
gpu() { bash .gpu/run.sh "$@"; }
bench() { gpu bench --backend webgpu --config bench-gpu --json "$@" 2>&1 | grep '^{' | tee -a "$out/bench.jsonl" | cut -c1-400; }
# pytorch fp32|tf32|bf16: the same step in PyTorch on the same GPU.
pytorch() {
  local extra
  case $1 in fp32) extra='' ;; tf32) extra=',"tf32":true' ;; bf16) extra=',"amp":"bfloat16"' ;; esac
  python3 .gpu/ref_distill_bench_gpu.py "{\"vocab\":32768,\"hidden\":1024,\"ffn\":3072,\"layers\":12,\"heads\":16,\"kv\":4,\"head_dim\":64,\"seq\":1024,\"batch\":8$extra}" 2>&1 | tail -1 | tee -a "$out/bench.jsonl" | cut -c1-160
}
export out
export -f gpu bench pytorch

echo "== GPU suite"
within 330 'CASCADE_TINY_MISTRAL=$PWD/.gpu/tiny-mistral gpu test > "$out/suite.log" 2>&1'
grep "✓\|×\|passed" "$out/suite.log" | cut -c1-700
echo "== bench-gpu distill-step beside PyTorch (t=$(($(date +%s) - start)) s)"
within 80 'bench --case distill-step --steps 3 --precision fp32'
within 80 'bench --case distill-step --steps 3 --precision mixed'
within 80 'bench --case distill-step --steps 3 --precision mixed --head-chunk 2048'
for precision in fp32 tf32 bf16; do within 45 "pytorch $precision"; done
echo "== profile and matmul (t=$(($(date +%s) - start)) s)"
within 80 'bench --case profile --precision mixed'
within 80 'bench --case matmul --steps 3 --tiling 4,4,1,1 --tiling 4,4,2,2,staged'
echo "== forward, decode, serving (t=$(($(date +%s) - start)) s)"
within 60 'bench --case forward --steps 3'
within 60 'bench --case decode --steps 3'
within 100 'gpu serve --model assets/parent --backend webgpu --concurrency 32 --tokens 64 2>&1 | grep "^{" | tee "$out/serve.jsonl" | cut -c1-300'
echo "== every command on webgpu (t=$(($(date +%s) - start)) s)"
within 300 'CASCADE="bash .gpu/run.sh cli" bash scripts/every-command.sh webgpu /tmp/every-command > "$out/every-command.log" 2>&1'
cut -c1-200 "$out/every-command.log"
echo "done in $(($(date +%s) - start)) s"

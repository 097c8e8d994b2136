#!/usr/bin/env bash
# Mixed precision against fp32 over a whole distillation, on the GPU machine: a 187M parent (8 layers,
# hidden 1280, FFN 5120, 16/4 heads of 64) trained on the text world with PyTorch
# (scripts/train_parent.py, its own tokenizer), pruned by cascade to a 105M student (6 layers, FFN
# 3584), then distilled STEPS steps (lr 1e-4) from the same start twice, --precision fp32 and
# --precision mixed, same data order, side by side (each is bound by tfjs' host time, not the GPU). Prints each
# run's mean KL over its last 20 steps, its tokens/s, the loss scale and skipped steps, and the mixed
# run's KL relative to fp32's (issue 12 asks for it within 2%, with no divergence); each run's
# metrics.jsonl goes to $OUT.
#
#   bash scripts/gpu-precision.sh [WORK] [TRAIN_SECONDS] [STEPS]    (from the repository root, .gpu carried)
#   PARENT="--hidden 64 ..." CHILD="--hidden 48 ..." CASCADE="node src/cli/main.ts" BACKEND=wasm bash scripts/gpu-precision.sh /tmp/p 5 30
#                                                                     (a small rehearsal on the CPU)
set -eu
work=${1:-/tmp/precision}
seconds=${2:-60}
steps=${3:-300}
parent_shape=${PARENT:---hidden 1280 --ffn 5120 --layers 8 --heads 16 --kv-heads 4 --head-dim 64 --batch 128 --lr 1e-3 --warmup 50}
child_shape=${CHILD:---layers 6 --hidden 1280 --ffn 3584}
lr=${LR:-1e-4}
out=${OUT:-$work}
mkdir -p "$work" "$out"
cli() { CASCADE_BACKEND=${BACKEND:-webgpu} ${CASCADE:-bash .gpu/run.sh cli} "$@"; }
root=$PWD
s=$(date +%s)
# A parent trained before in WORK is kept: another student needs only pruning and distillation.
if [ ! -f "$work/parent/config.json" ]; then
  python3 scripts/train_parent.py --data data --out "$work/parent" $parent_shape --steps 2000 --train-seconds "$seconds" --eval-every 100000 2>&1 | grep -v -i "warn" | tail -4
  echo "parent trained, t=$(($(date +%s) - s)) s"
fi
cli calibrate --model "$work/parent" --data "$root/data/calib.jsonl" --out "$work/stats" --seq 128 --samples 64 --batch 8 2>&1 | tail -1
cli prune --model "$work/parent" --stats "$work/stats" --out "$work/child" $child_shape 2>&1 | tail -2
echo "child pruned, t=$(($(date +%s) - s)) s"
distill() { # distill PRECISION
  local started=$(date +%s)
  cli distill --student "$work/child" --teacher "$work/parent" --data "$root/data/train.jsonl" --out "$work/distill-$1" \
    --steps "$steps" --seq 128 --batch 16 --lr "$lr" --save-every "$steps" --precision "$1" > "$work/distill-$1.log" 2>&1 || { tail -5 "$work/distill-$1.log"; return 1; }
  cp "$work/distill-$1/metrics.jsonl" "$out/metrics-$1.jsonl"
  echo "distilled in $1: $(($(date +%s) - started)) s"
}
distill fp32 & fp32=$!
# .gpu/run.sh unpacks the Vulkan loader and runs ldconfig each time: two at once race on its cache.
sleep 15
distill mixed & mixed=$!
wait $fp32 && wait $mixed
python3 - "$work" <<'EOF'
import json, sys
work = sys.argv[1]
def summary(precision):
    rows = [json.loads(line) for line in open(f"{work}/distill-{precision}/metrics.jsonl")]
    kl = sum(r["kl"] for r in rows[-20:]) / len(rows[-20:])
    speed = sum(r["tokens_per_s"] for r in rows[1:]) / (len(rows) - 1)
    return {"precision": precision, "steps": len(rows), "kl_first": rows[0]["kl"], "kl_last20": kl, "kl_max": max(r["kl"] for r in rows),
            "tokens_per_s": speed, "loss_scale": rows[-1].get("loss_scale"), "skipped_steps": rows[-1].get("skipped_steps")}
fp32, mixed = summary("fp32"), summary("mixed")
for s in (fp32, mixed): print(json.dumps(s))
print(json.dumps({"mixed_vs_fp32_kl": mixed["kl_last20"] / fp32["kl_last20"] - 1}))
EOF
echo "done in $(($(date +%s) - s)) s"

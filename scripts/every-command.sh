#!/usr/bin/env bash
# Every `cascade` command, run to completion on one backend with the embedded parent (the one with
# eyes, assets/parent-vl) and few steps: calibrate, prune, teacher-cache, distill from each teacher
# source (in process, cache, served), eval, serve (completion, chat, a chat with a picture, and as a
# judge), sft, pwrm train (on the text parent), grpo, odpo and post-train; and with pictures: eval,
# the projector step, distill, sft and grpo.
# Prints one line per command with its wall time; exits 1 if any failed (its log is kept in WORK).
#
#   bash scripts/every-command.sh [BACKEND] [WORK]       (default: webgpu, a new temporary folder)
#   CASCADE="bash .gpu/run.sh cli" bash scripts/every-command.sh webgpu   (on the GPU machine's bundle)
set -u
backend=${1:-webgpu}
work=$(realpath -m "${2:-$(mktemp -d)}")
cascade=${CASCADE:-node src/cli/main.ts}
# Absolute paths: the GPU bundle's run.sh runs the CLI from its own folder.
root=$PWD
parent=$root/assets/parent-vl
text=$root/assets/parent
port=${PORT:-18231}
export CASCADE_BACKEND=$backend
mkdir -p "$work"
failed=0

step() { # step NAME ARGS...: runs `cascade ARGS...`, logging to WORK/NAME.log
  local name=$1
  shift
  local started=$(date +%s%N)
  local ok=0
  $cascade "$@" > "$work/$name.log" 2>&1 || ok=$?
  local seconds=$(( ($(date +%s%N) - started) / 1000000 ))e-3
  if [ $ok = 0 ]; then
    printf '✓ %-22s %6.1f s\n' "$name" "$seconds"
  else
    failed=1
    printf '× %-22s %6.1f s: %s\n' "$name" "$seconds" "$(tr '\r' '\n' < "$work/$name.log" | grep -v '^\s*$' | tail -3 | tr '\n' ' ' | cut -c1-300)"
  fi
}

post() { # post PATH [JSON]: a request to the served model (a GET without JSON); prints the reply's first 160 characters
  python3 -c 'import sys,urllib.request
body = sys.argv[2].encode() if sys.argv[2] else None
request = urllib.request.Request(sys.argv[1], data=body, headers={"Content-Type": "application/json"})
print(urllib.request.urlopen(request, timeout=120).read().decode()[:160])' "http://127.0.0.1:$port$1" "${2:-}"
}

common="--seq 64 --batch 4 --lr 0.001"
step calibrate calibrate --model $parent --data $root/data/calib.jsonl --out "$work/stats" --seq 64 --samples 16 --batch 4
step prune prune --model $parent --stats "$work/stats" --out "$work/child" --layers 4 --hidden 96 --ffn 256
step teacher-cache teacher-cache --teacher $parent --data $root/data/calib.jsonl --top-k 16 --out "$work/cache" --seq 64 --batch 4
step distill distill --student "$work/child" --teacher $parent --data $root/data/distill.jsonl --out "$work/distill" --steps 4 $common
step distill-from-cache distill --student "$work/child" --teacher "$work/cache" --data $root/data/calib.jsonl --out "$work/distill-cache" --steps 3 $common --top-k 16 --no-document-mask
step eval eval --model "$work/distill" --data $root/data/heldout.jsonl --json
step eval-images eval --model "$work/distill" --data $root/data/vision/distill.jsonl --json
step projector projector --student "$work/child" --teacher $parent --data $root/data/vision/distill.jsonl --out "$work/projected" --steps 20 --batch 4 --lines 40
step distill-images distill --student "$work/projected" --teacher $parent --data $root/data/vision/distill.jsonl --out "$work/distill-images" --steps 3 $common

$cascade serve --model $parent --port $port > "$work/serve.log" 2>&1 &
server=$!
for _ in $(seq 1 120); do post /v1/models > /dev/null 2>&1 && break; sleep 1; done 2> /dev/null
if completion=$(post /v1/completions '{"model":"'$parent'","prompt":"The capital of","max_tokens":8,"temperature":0}') &&
  chat=$(post /v1/chat/completions '{"model":"'$parent'","messages":[{"role":"user","content":"What is 2 + 3?"}],"max_tokens":8}') &&
  picture=$(post /v1/chat/completions "$(python3 -c 'import base64,json,sys
url = "data:image/png;base64," + base64.b64encode(open(sys.argv[2], "rb").read()).decode()
print(json.dumps({"model": sys.argv[1], "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "How many shapes are in the picture?"}]}]}))' "$parent" "$root/data/vision/images/eval-scene-00000.png")"); then
  echo "✓ serve: $completion"
  echo "✓ serve chat: $chat"
  echo "✓ serve chat with a picture: $picture"
else
  failed=1
  echo "× serve: $(tail -3 "$work/serve.log")"
fi
step distill-from-server distill --student "$work/child" --teacher "http://127.0.0.1:$port" --data $root/data/distill.jsonl --out "$work/distill-remote" --steps 3 $common
step sft sft --model "$work/distill" --data $root/data/post/sft-instruct.jsonl --teacher $parent --distill-weight 0.5 --out "$work/sft" --steps 3 --seq 128 --batch 4 --lr 0.001
step sft-images sft --model "$work/distill" --data $root/data/vision/sft-visual.jsonl --out "$work/sft-images" --steps 2 --seq 64 --batch 4 --lr 0.001
step pwrm pwrm train --model $text --data $root/data/post/preferences.jsonl --heldout $root/data/post/preferences-heldout.jsonl --out "$work/pwrm" --steps 3 --batch 4 --seq 96 --lr 0.0005
step grpo grpo --model "$work/sft" --prompts $root/data/post/grpo-verifiable.jsonl --out "$work/grpo" --steps 2 --batch 2 --group 4 --max-new-tokens 24 --lr 2e-5
step grpo-judged grpo --model "$work/sft" --prompts $root/data/post/grpo-rubric.jsonl --judge "http://127.0.0.1:$port" --out "$work/grpo-judged" --steps 1 --batch 2 --group 2 --max-new-tokens 24 --lr 2e-5
step grpo-images grpo --model "$work/distill" --prompts $root/data/vision/grpo-count.jsonl --out "$work/grpo-images" --steps 1 --batch 2 --group 4 --max-new-tokens 8 --lr 2e-5
step odpo odpo --model "$work/sft" --prompts $root/data/post/odpo-prompts.jsonl --pwrm "$work/pwrm" --out "$work/odpo" --steps 2 --batch 2 --max-new-tokens 24 --lr 5e-5
kill $server

# post-train with every stage at a step or two, its judge and PWRM trained from the parent.
python3 - "$work" "$PWD" <<'EOF'
import json, sys
work, root = sys.argv[1], sys.argv[2]
config = json.load(open(f"{root}/configs/post-train.json"))
def resolve(node):
    if isinstance(node, dict): return {key: resolve(value) for key, value in node.items()}
    if isinstance(node, list): return [resolve(value) for value in node]
    return f"{root}/configs/{node}" if isinstance(node, str) and node.startswith("../") else node
config = resolve(config)
config.update(run=f"{work}/post-train", start=f"{work}/distill", report=f"{work}/post-train-report.md")
for stage in [config["judge"]["sft"], config["pwrm"], *config["instruct"].values(), *config["reasoning"].values(), *config.get("visual", {}).values()]:
    stage["steps"] = 1 if "maxNewTokens" in stage else 2
    if "maxNewTokens" in stage: stage["maxNewTokens"] = 16
    if "group" in stage: stage["group"] = 2
ev = config["evaluation"]
ev.update(recallLimit=4, maxNewTokens=16, rubricLimit=2, rubricMaxNewTokens=16, visualLimit=4)
ev["win"].update(limit=2, samples=1, maxNewTokens=16)
json.dump(config, open(f"{work}/post-train.json", "w"), indent=2)
EOF
step post-train post-train "$work/post-train.json"

echo "logs and outputs: $work"
exit $failed

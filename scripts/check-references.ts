/**
 * Compares models with reference files made by transformers, on any backend, and prints one JSON
 * line per reference: the largest logit and hidden-state differences (padded positions left out).
 *
 *   node scripts/check-references.ts [--backend B] MODEL_DIR[=REFERENCE_FILE] ...
 *
 * Without `=REFERENCE_FILE`, reference.safetensors and reference-padded.safetensors in MODEL_DIR are used. Exits 1 when a
 * logit differs by more than --tolerance (default 1e-4).
 */
import { NodeRuntime } from "@effect/platform-node"
import { Console, Effect } from "effect"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import { parseArgs } from "node:util"
import { type BackendName, TensorBackend } from "../layers/TensorBackend.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Reference from "../src/io/Reference.ts"

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { backend: { type: "string" }, tolerance: { type: "string", default: "1e-4" } }
})
const tolerance = Number(values.tolerance)

const pairs = (arg: string) =>
  Effect.promise(async () => {
    const [dir, file] = arg.split("=")
    if (file) return [{ dir, file }]
    const names = (await fs.readdir(dir)).filter((name) => /^reference(-padded)?\.safetensors$/.test(name))
    return names.map((name) => ({ dir, file: path.join(dir, name) }))
  })

const program = Effect.gen(function*() {
  const backend = yield* TensorBackend
  let worst = 0
  for (const arg of positionals) {
    for (const { dir, file } of yield* pairs(arg)) {
      const diff = yield* Effect.scoped(
        Effect.gen(function*() {
          return yield* Reference.compare(yield* Pretrained.load(dir), yield* Reference.open(file))
        })
      )
      worst = Math.max(worst, diff.logits)
      yield* Console.log(JSON.stringify({ backend: backend.name, device: backend.device, model: dir, reference: path.basename(file), logits: diff.logits, hiddenStates: Math.max(...diff.hiddenStates) }))
    }
  }
  if (worst > tolerance) return yield* Effect.fail(`largest logit difference ${worst} exceeds ${tolerance}`)
}).pipe(Effect.provide(TensorBackend.layer(values.backend as BackendName | undefined)))

NodeRuntime.runMain(program)

/**
 * Makes `test/fixtures/mistral-long-phase`: the shared tiny-mistral (a MistralForCausalLM) with the
 * long-context phase's config (`Config.longContext`: a Ministral3ForCausalLM with YaRN factor 4 over
 * 12 original positions and llama_4_scaling_beta 0.1), weights unchanged, saved as Cascade saves a
 * long-phase student. Its 48-token references (positions 0..47, so floor(pos / 12) = 0..3) are then
 * computed with transformers on the GPU machine, as test/fixtures/README.md says.
 *
 *   node scripts/make_long_phase_fixture.ts [--out test/fixtures/mistral-long-phase]
 */
import { NodeRuntime } from "@effect/platform-node"
import { Console, Effect } from "effect"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import { parseArgs } from "node:util"
import { TensorBackend } from "../layers/TensorBackend.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Config from "../src/model/Config.ts"
import * as Model from "../src/model/Model.ts"

/** What the fixture's config is made with; test/Model.test.ts checks the saved config against it. */
export const longPhase: Config.LongContext = { factor: 4, originalMax: 12, scalingBeta: 0.1 }

const parent = fileURLToPath(new URL("../../shared/fixtures/tiny-mistral", import.meta.url))

const program = (out: string) =>
  Effect.gen(function*() {
    const model = yield* Pretrained.load(parent)
    const long = Model.make(Config.longContext(model.config, longPhase), model.weights)
    yield* Pretrained.save(out, long, { dtype: "F32", companionsFrom: parent })
    yield* Console.log(`wrote ${out}`)
  }).pipe(Effect.scoped, Effect.provide(TensorBackend.layer()))

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const { values } = parseArgs({ options: { out: { type: "string", default: "test/fixtures/mistral-long-phase" } } })
  NodeRuntime.runMain(program(path.resolve(values.out)))
}

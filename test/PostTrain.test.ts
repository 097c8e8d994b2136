import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import * as PostTrain from "../stages/PostTrain.ts"
import { onBackend, tempDir } from "./support.ts"

const parent = fileURLToPath(new URL("../assets/parent", import.meta.url))
const post = (file: string) => fileURLToPath(new URL(`../data/post/${file}`, import.meta.url))

const mtime = (file: string) => Effect.promise(() => fs.stat(file).then((s) => s.mtimeMs))

/** The first `count` lines of a shipped post-training file, copied into `dir`. */
const head = (dir: string, file: string, count: number) =>
  Effect.promise(async () => {
    const lines = (await fs.readFile(post(file), "utf8")).split("\n").slice(0, count)
    await fs.writeFile(path.join(dir, file), lines.join("\n") + "\n")
    return path.join(dir, file)
  })

describe("PostTrain.run", () => {
  it.effect("runs both pipelines in order, resumes a stopped run without redoing finished steps, and reports every model", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const online = { steps: 1, batch: 2, maxNewTokens: 6, lr: 1e-4 }
      const config = yield* PostTrain.decodeConfig({
        run: path.join(dir, "run"),
        start: parent,
        teacher: parent,
        judge: { model: parent, retries: 0, maxTokens: 2 },
        pwrm: { backbone: parent, data: yield* head(dir, "preferences.jsonl", 8), heldout: yield* head(dir, "preferences-heldout.jsonl", 6), steps: 2, batch: 2, seq: 64, lr: 1e-4 },
        instruct: {
          sft: { data: yield* head(dir, "sft-instruct.jsonl", 8), steps: 2, batch: 2, seq: 64, lr: 1e-4, distillWeight: 0.5 },
          odpo: { ...online, prompts: yield* head(dir, "odpo-prompts.jsonl", 4), beta: 0.1 }
        },
        reasoning: {
          sft: { data: yield* head(dir, "sft-reasoning.jsonl", 8), steps: 2, batch: 2, seq: 64, lr: 1e-4, distillWeight: 0 },
          grpoVerifiers: { ...online, prompts: yield* head(dir, "grpo-verifiable.jsonl", 4), group: 2 },
          grpoRubrics: { ...online, batch: 1, prompts: yield* head(dir, "grpo-rubric.jsonl", 2), group: 2 },
          odpo: { ...online, prompts: yield* head(dir, "odpo-prompts.jsonl", 4), beta: 0.1 }
        },
        evaluation: {
          arith: post("eval-arith-chat.jsonl"),
          recall: post("eval-recall-chat.jsonl"),
          arithLimit: 3,
          recallLimit: 3,
          maxNewTokens: 6,
          win: { prompts: [post("eval-recall-chat.jsonl")], limit: 3, samples: 1, temperature: 0, maxNewTokens: 6 }
        },
        seed: 3
      })

      // Stop in the rubric GRPO step: everything before it has finished.
      const order: Array<string> = []
      const stop = new Error("stopped")
      const first = yield* Effect.exit(PostTrain.run(config, {
        events: {
          onStep: (label) => {
            if (!order.includes(label)) order.push(label)
            if (label.includes("grpo-rubrics")) throw stop
          }
        }
      }))
      assert.strictEqual(first._tag, "Failure")
      assert.deepStrictEqual(order, [
        "[pwrm]",
        "[instruct 1/2 sft-distill]",
        "[instruct 2/2 odpo]",
        "[reasoning 1/4 sft-cot]",
        "[reasoning 2/4 grpo-verifiers]",
        "[reasoning 3/4 grpo-rubrics]"
      ])
      const sft = path.join(config.run, "instruct", "1-sft-distill", "model.safetensors")
      const before = yield* mtime(sft)

      const again: Array<string> = []
      const rows = yield* PostTrain.run(config, { events: { onStep: (label) => again.includes(label) || again.push(label) } })
      assert.deepStrictEqual(again, ["[reasoning 3/4 grpo-rubrics]", "[reasoning 4/4 odpo]"], "finished steps are not run again")
      assert.strictEqual(yield* mtime(sft), before)
      const metrics = yield* Effect.promise(() => fs.readFile(path.join(config.run, "reasoning", "3-grpo-rubrics", "metrics.jsonl"), "utf8"))
      // The parent answers a yes-or-no question with neither: every rubric item is left undecided.
      assert.strictEqual(JSON.parse(metrics).unscored, 2)

      assert.deepStrictEqual(rows.map((r) => r.model), [
        "start",
        "instruct/1-sft-distill",
        "instruct/2-odpo",
        "reasoning/1-sft-cot",
        "reasoning/2-grpo-verifiers",
        "reasoning/3-grpo-rubrics",
        "reasoning/4-odpo"
      ])
      for (const row of rows) {
        for (const x of [row.arith, row.recall]) assert.isTrue(x >= 0 && x <= 1)
        if (row.model === "start") assert.isUndefined(row.winVsPrevious)
        else assert.isTrue(row.winVsPrevious! >= 0 && row.winVsPrevious! <= 1)
      }
      // The rubric step made no update, so its model answers as the one before it: a tie.
      assert.closeTo(rows[5].winVsPrevious!, 0.5, 1e-9)
      const report = yield* Effect.promise(() => fs.readFile(path.join(config.run, "post-train-report.md"), "utf8"))
      assert.include(report, PostTrain.table(rows))
      const json = JSON.parse(yield* Effect.promise(() => fs.readFile(path.join(config.run, "post-train-report.json"), "utf8")))
      assert.strictEqual(json.rows.length, 7)
    }).pipe(onBackend("wasm")), { timeout: 90_000 })
})

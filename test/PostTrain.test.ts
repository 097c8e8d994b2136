import { assert, describe, it } from "@effect/vitest"
import { Effect, Schema } from "effect"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import * as Report from "../src/report/Report.ts"
import * as PostTrain from "../stages/PostTrain.ts"
import * as Model from "../src/model/Model.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import type { GrpoMetrics } from "../stages/Grpo.ts"
import { maxAbsDiff, onBackend, ruleVerdict, standInJudge, take, tempDir } from "./support.ts"

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
        judge: {
          model: parent,
          sft: { data: yield* head(dir, "sft-judge.jsonl", 4), steps: 1, batch: 2, seq: 192, lr: 1e-4, distillWeight: 0 },
          heldout: yield* head(dir, "judge-heldout.jsonl", 3),
          retries: 0,
          maxTokens: 2
        },
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
          rubric: post("eval-rubric-chat.jsonl"),
          rubricLimit: 2,
          maxNewTokens: 6,
          win: { prompts: [post("eval-recall-chat.jsonl")], limit: 3, samples: 1, temperature: 0, maxNewTokens: 6 }
        },
        report: path.join(dir, "report.md"),
        seed: 3
      })
      // The cascade's report, which gets a post-training section.
      yield* Effect.promise(() => fs.writeFile(config.report!, Report.withSection("", "cascade", "# Cascade report\n\n| the retention table |")))

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
        "[judge]",
        "[instruct 1/2 sft-distill]",
        "[instruct 2/2 odpo]",
        "[reasoning 1/4 sft-cot]",
        "[reasoning 2/4 grpo-verifiers]",
        "[reasoning 3/4 grpo-rubrics]"
      ])
      const sft = path.join(config.run, "instruct", "1-sft-distill", "model.safetensors")
      const before = yield* mtime(sft)

      const again: Array<string> = []
      const { rows, judge } = yield* PostTrain.run(config, { events: { onStep: (label) => again.includes(label) || again.push(label) } })
      assert.deepStrictEqual(again, ["[reasoning 3/4 grpo-rubrics]", "[reasoning 4/4 odpo]"], "finished steps are not run again")
      assert.strictEqual(yield* mtime(sft), before)
      const metrics = yield* Effect.promise(() => fs.readFile(path.join(config.run, "reasoning", "3-grpo-rubrics", "metrics.jsonl"), "utf8"))
      // The judge, the parent after one step on judge chats, answers a yes-or-no question with
      // neither: every rubric item is left undecided.
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
        // The judge, barely fine-tuned, decides nothing.
        assert.isUndefined(row.rubric)
        if (row.model === "start") assert.isUndefined(row.winVsPrevious)
        else assert.isTrue(row.winVsPrevious! >= 0 && row.winVsPrevious! <= 1)
      }
      // The rubric step made no update, so its model answers as the one before it: a tie.
      assert.closeTo(rows[5].winVsPrevious!, 0.5, 1e-9)
      const report = yield* Effect.promise(() => fs.readFile(path.join(config.run, "post-train-report.md"), "utf8"))
      assert.include(report, PostTrain.table(rows))
      assert.deepStrictEqual(Report.sections(yield* Effect.promise(() => fs.readFile(config.report!, "utf8"))).map((s) => [s.name, s.body.split("\n")[0]]), [
        ["cascade", "# Cascade report"],
        ["post-training", "## Post-training"]
      ])
      // Training curves, linked from both reports.
      const losses = yield* Effect.promise(() => fs.readFile(path.join(config.run, "post-train-losses.svg"), "utf8"))
      for (const name of ["judge", "pwrm", "instruct/1-sft-distill", "reasoning/1-sft-cot"]) assert.include(losses, name)
      for (const plot of ["post-train-rewards.svg", "post-train-odpo.svg"]) {
        assert.include(yield* Effect.promise(() => fs.readFile(path.join(config.run, plot), "utf8")), "<svg")
      }
      assert.include(report, "Plots: post-train-losses.svg, post-train-rewards.svg, post-train-odpo.svg")
      assert.include(yield* Effect.promise(() => fs.readFile(config.report!, "utf8")), "Plots: run/post-train-losses.svg")
      assert.strictEqual(judge.dir, path.join(config.run, "judge-model"))
      assert.strictEqual(judge.heldout?.questions, 3)
      const json = JSON.parse(yield* Effect.promise(() => fs.readFile(path.join(config.run, "post-train-report.json"), "utf8")))
      assert.strictEqual(json.rows.length, 7)

      // Another learning rate for SFT on traces: that step and every step after it run again,
      // replacing what they wrote, since each starts from the model the one before it wrote.
      // This time the judge is an external service that decides: a stand-in on loopback that
      // answers by a rule, so that the rubric step gets rewards and updates the policy.
      const external = yield* standInJudge
      const changed = {
        ...config,
        judge: { model: "stand-in", urls: [external.url], retries: 0, heldout: config.judge.heldout },
        reasoning: { ...config.reasoning, sft: { ...config.reasoning.sft, lr: 5e-4 } }
      }
      const rerun: Array<string> = []
      let rubricVerdicts = -1
      const rerunReport = yield* PostTrain.run(changed, {
        branches: ["reasoning"],
        events: {
          onStep: (label) => {
            rerun.includes(label) || rerun.push(label)
            // The rubric step has one step: the verdicts so far are its own.
            if (label.includes("grpo-rubrics")) rubricVerdicts = external.verdicts.length
          }
        }
      })
      assert.deepStrictEqual(rerun, ["[reasoning 1/4 sft-cot]", "[reasoning 2/4 grpo-verifiers]", "[reasoning 3/4 grpo-rubrics]", "[reasoning 4/4 odpo]"])
      const rubricStep = path.join(changed.run, "reasoning", "3-grpo-rubrics")
      const judged = JSON.parse(yield* Effect.promise(() => fs.readFile(path.join(rubricStep, "metrics.jsonl"), "utf8"))) as GrpoMetrics
      // One prompt, a group of two: each sample's reward is the share of its rubric items the rules say are satisfied.
      const { items } = JSON.parse((yield* Effect.promise(() => fs.readFile(changed.reasoning.grpoRubrics.prompts, "utf8"))).split("\n")[0]).task
      assert.strictEqual(rubricVerdicts, 2 * items.length, "every item of both samples was asked")
      const asked = external.verdicts.slice(0, rubricVerdicts)
      const responses = [...new Set(asked.map((v) => v.response))]
      assert.strictEqual(responses.length, 2, "two different responses")
      const rewards = responses.map((response) => items.filter((item: string) => ruleVerdict(response, item)).length / items.length)
      assert.deepStrictEqual(asked.map((v) => v.passed), asked.map((v) => ruleVerdict(v.response, v.item)))
      assert.strictEqual(judged.unscored, 0, "the judge decided every sample")
      assert.approximately(judged.reward_mean!, (rewards[0] + rewards[1]) / 2, 1e-12)
      assert.notStrictEqual(rewards[0], rewards[1], "the group's rewards differ")
      assert.strictEqual(judged.groups, 1, "the group is kept")
      assert.isAbove(judged.grad_norm!, 0)
      // The update moved the policy away from the model the step started from.
      const startModel = yield* Pretrained.load(path.join(changed.run, "reasoning", "2-grpo-verifiers"))
      const endModel = yield* Pretrained.load(rubricStep)
      const moved = [...Model.tensorsOfWeights(startModel.config, startModel.weights)].map(([name, tensor]) =>
        maxAbsDiff(take(tensor.clone()), take(Model.tensorsOfWeights(endModel.config, endModel.weights).get(name)!.clone()))
      )
      assert.isAbove(Math.max(...moved), 0, "the rubric step changed the weights")
      // The judge decides the held-out rubric prompts too: every model gets a rubric score.
      for (const row of rerunReport.rows) assert.isTrue(row.rubric! >= 0 && row.rubric! <= 1, row.model)

      // The instruct branch alone, with no judged evaluation, has no use for a judge: none is trained.
      const unjudged = {
        ...config,
        run: path.join(dir, "instruct-only"),
        judge: { ...config.judge, heldout: undefined },
        evaluation: { ...config.evaluation, rubric: undefined }
      }
      const labels: Array<string> = []
      yield* PostTrain.run(unjudged, { branches: ["instruct"], events: { onStep: (label) => labels.includes(label) || labels.push(label) } })
      assert.deepStrictEqual(labels, ["[pwrm]", "[instruct 1/2 sft-distill]", "[instruct 2/2 odpo]"])
      assert.isFalse(yield* Effect.promise(() => fs.access(path.join(unjudged.run, "judge-model")).then(() => true, () => false)))
    }).pipe(onBackend("wasm")), { timeout: 90_000 })
})

describe("PostTrain.judgeAccuracy", () => {
  const question = (verdict: boolean, kind?: string) => ({ prompt: "p", response: "r", item: "i", verdict, kind })

  it("counts decided verdicts only, overall and per kind, and says why the first undecided one failed", () => {
    const accuracy = PostTrain.judgeAccuracy(
      [question(true, "fact"), question(false, "fact"), question(true, "repeats"), question(false, "fact"), question(true)],
      [{ passed: true }, { passed: true }, { passed: true }, { passed: undefined, note: "timed out" }, { passed: false }]
    )
    assert.deepStrictEqual(accuracy, {
      questions: 5,
      decided: 4,
      accuracy: 2 / 4,
      yesShare: 3 / 4,
      trueYesShare: 3 / 4,
      byKind: { fact: { decided: 2, accuracy: 1 / 2 }, repeats: { decided: 1, accuracy: 1 } },
      firstFailure: "timed out"
    })
    assert.deepStrictEqual(PostTrain.judgeAccuracy([question(true)], [{ passed: undefined, note: "no" }]).accuracy, undefined)
  })

  it.prop("is the share of decided verdicts that agree, per kind as overall", {
    rows: Schema.Array(Schema.Struct({
      truth: Schema.Boolean,
      said: Schema.UndefinedOr(Schema.Boolean),
      kind: Schema.Literals(["fact", "sentences", "repeats"])
    })).check(Schema.isMaxLength(30))
  }, ({ rows }) => {
    const result = PostTrain.judgeAccuracy(rows.map((r) => question(r.truth, r.kind)), rows.map((r) => ({ passed: r.said, note: "x" })))
    const decided = rows.filter((r) => r.said !== undefined)
    assert.strictEqual(result.decided, decided.length)
    assert.strictEqual(Object.values(result.byKind).reduce((sum, k) => sum + k.decided, 0), decided.length)
    const agreeing = Object.values(result.byKind).reduce((sum, k) => sum + k.decided * k.accuracy!, 0)
    if (decided.length === 0) assert.isUndefined(result.accuracy)
    else assert.closeTo(result.accuracy!, agreeing / decided.length, 1e-12)
    assert.strictEqual(result.firstFailure, decided.length === rows.length ? undefined : "x")
  })
})

/**
 * A vocabulary matrix split into row blocks (as a GPU splits one past its storage binding limit)
 * changes nothing: the same logits, gradients, training step, pruned child and saved bytes as the
 * unsplit model. Blocks are forced small on wasm, with odd sizes that do not divide the vocabulary.
 */
import { assert, describe, it } from "@effect/vitest"
import * as tf from "@tensorflow/tfjs"
import { Effect, Schema } from "effect"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import * as Calibration from "../src/prune/Calibration.ts"
import * as Model from "../src/model/Model.ts"
import * as Optimizer from "../src/train/Optimizer.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Pruning from "../src/prune/Pruning.ts"
import * as Random from "../src/Random.ts"
import * as RunFolder from "../src/train/RunFolder.ts"
import * as RowBlocks from "../src/model/RowBlocks.ts"
import * as Training from "../src/train/Training.ts"
import { LogitsTooLarge } from "../src/Errors.ts"
import { localFixture, maxAbsDiff, onBackend, sharedFixture, take, tempDir } from "./support.ts"

/** An untied and a tied model, both of vocabulary 512. */
const fixtures = { untied: sharedFixture("tiny-mistral"), tied: localFixture("mistral-tied") }

/** Odd block sizes: none divides the vocabulary of 512, so the last block is always shorter. */
const Split = Schema.Struct({
  half: Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 150 })),
  tied: Schema.Boolean
})

/** `effect` run with vocabulary matrices uploaded in blocks of `rows` rows. */
const withRows = <A, E, R>(rows: number, effect: Effect.Effect<A, E, R>) =>
  Effect.acquireUseRelease(
    Effect.sync(() => RowBlocks.forceRows(rows)),
    () => effect,
    () => Effect.sync(() => RowBlocks.forceRows(undefined))
  )

/** `dir` loaded with blocks of `rows` rows. */
const loadSplit = (dir: string, rows: number) => withRows(rows, Pretrained.load(dir))

/** The fixture `split` names loaded whole and in blocks of its odd size. */
const bothWays = Effect.fnUntraced(function*(split: typeof Split.Type) {
  const rows = 2 * split.half + 1
  const dir = split.tied ? fixtures.tied : fixtures.untied
  return { rows, whole: yield* Pretrained.load(dir), blocked: yield* loadSplit(dir, rows) }
})

/** Seeded token rows over the vocabulary, every id from 0 to 511 likely among them. */
const tokenRows = (seed: number, rows: number, length: number) => {
  const next = Random.uniform(seed)
  return Array.from({ length: rows }, () => Array.from({ length }, () => Math.floor(next() * 512)))
}

const ids = tokenRows(5, 3, 24)
const targets = tokenRows(6, 3, 24)

/** Next-token cross-entropy of the rows, a mean over their tokens (through a one-hot: tf.gather's gradient is not on wasm). */
const lossOf = (model: Model.Model): Training.Objective => ({
  loss: tf.neg(tf.mean(tf.sum(tf.mul(tf.logSoftmax(Model.forward(model, ids).logits), tf.oneHot(tf.tensor2d(targets, undefined, "int32"), 512)), -1))),
  tokens: ids.length * ids[0].length,
  metrics: {}
})

/** Each checkpoint tensor's values from tensors keyed as the model keys its own (blocks joined). */
const byCheckpointName = (model: Model.Model, tensors: ReadonlyMap<string, tf.Tensor>) =>
  Effect.promise(async () =>
    new Map(await Promise.all(Model.tensorShapes(model.config).map(async ({ name }) => [name, await Model.storedValues(tensors, name)] as const)))
  )

/** The largest difference between two sets of checkpoint tensors, relative to each tensor's largest value. */
const worstRelative = (a: ReadonlyMap<string, Float32Array>, b: ReadonlyMap<string, Float32Array>) =>
  Math.max(...[...a].map(([name, values]) => maxAbsDiff(values, b.get(name)!) / Math.max(...values.map(Math.abs), 1e-30)))

const learningRate = 1e-3

/** Gradients of `lossOf`, a training step's loss and gradient norm, the weights after it and the optimizer's moments. */
const trainingStep = (model: Model.Model) =>
  Effect.gen(function*() {
    const run = yield* Training.trainable(model)
    const nameOf = new Map([...run.variables].map(([name, variable]) => [variable.name, name]))
    const { value, grads } = tf.variableGrads(() => lossOf(run.model).loss, [...run.variables.values()])
    const named = new Map(Object.entries(grads).map(([id, grad]) => [nameOf.get(id)!, grad]))
    const gradients = yield* byCheckpointName(model, named)
    tf.dispose([value, ...Object.values(grads)])
    const adam = yield* Optimizer.make(run.variables, Optimizer.defaultConfig)
    const step = yield* Training.step(run, adam, [undefined], lossOf, { learningRate, maxGradNorm: 1 })
    const after = yield* byCheckpointName(model, run.variables)
    // What a resumed run does: the moments saved by name go back onto the same variables.
    const state = yield* Optimizer.exportState(adam)
    yield* Optimizer.make(run.variables, Optimizer.defaultConfig, state)
    return { gradients, step, after, names: [...run.variables.keys()] }
  }).pipe(Effect.scoped)

describe("a vocabulary matrix split into row blocks", () => {
  it.effect.prop("gives the unsplit model's logits, gradients and training step", { split: Split }, ({ split }) =>
    Effect.gen(function*() {
      const { rows, whole, blocked } = yield* bothWays(split)
      assert.strictEqual(blocked.weights.embed.length, Math.ceil(512 / rows))
      assert.strictEqual(blocked.weights.lmHead?.length, split.tied ? undefined : Math.ceil(512 / rows))
      const before = tf.memory().numTensors

      assert.strictEqual(maxAbsDiff(take(Model.forward(blocked, ids).logits), take(Model.forward(whole, ids).logits)), 0, "logits")
      const a = yield* trainingStep(blocked)
      const b = yield* trainingStep(whole)
      // Not bit-exact: the hidden state's gradient sums the blocks' products dlogits_i B_i one block at a time.
      assert.isAtMost(worstRelative(a.gradients, b.gradients), 1e-5, "gradients")
      assert.approximately(a.step.loss, b.step.loss, 1e-6)
      assert.approximately(a.step.gradNorm, b.step.gradNorm, 1e-6 * b.step.gradNorm)
      // Adam's first step is about lr sign(g): where g is near eps, rounding moves it by a small part of lr.
      const moved = Math.max(...[...a.after].map(([name, values]) => maxAbsDiff(values, b.after.get(name)!)))
      assert.isAtMost(moved, 0.1 * learningRate, "weights after the step")
      assert.include(a.names, `model.embed_tokens.weight[0:${rows}]`)
      assert.strictEqual(tf.memory().numTensors, before, "no tensor left behind")
    }).pipe(onBackend("wasm")), { timeout: 120_000, arbitrary: { runs: 8 } })

  it.effect.prop("is pruned into the unsplit model's child, rotated, tied by each rule or untied", { split: Split }, ({ split }) =>
    Effect.gen(function*() {
      const { rows, whole, blocked } = yield* bothWays(split)
      const calibration = tokenRows(9, 4, 16)
      const stats = yield* Calibration.observe(whole, calibration, calibration.map((row) => row.map(() => 1)))
      const before = tf.memory().numTensors
      const targetsOf: Array<Pruning.Targets> = [
        { layers: 1, hidden: 40, ffn: 96 },
        ...Pruning.tieRules.map((tieFrom) => ({ hidden: 40, tieEmbeddings: true, tieFrom })),
        ...Pruning.tieRules.map((tieFrom) => ({ hidden: 64, tieEmbeddings: true, tieFrom }))
      ]
      for (const targets of targetsOf) {
        const plan = Pruning.plan(whole.config, stats, targets, { kind: "scores" })
        const [a, b] = [yield* Pruning.build(blocked, plan), yield* Pruning.build(whole, plan)]
        assert.strictEqual(a.model.weights.embed.length, Math.ceil(512 / rows))
        const difference = worstRelative(
          yield* byCheckpointName(a.model, Model.tensorsOfWeights(a.model.config, a.model.weights)),
          yield* byCheckpointName(b.model, Model.tensorsOfWeights(b.model.config, b.model.weights))
        )
        // fit turns the basis by the eigenvectors of a fitted matrix, which rounding may turn within
        // nearly equal eigenvalues: the child's function is the same, its tensors not exactly.
        if (targets.tieFrom !== "fit") assert.isAtMost(difference, 1e-5, `tensors, ${JSON.stringify(targets)}`)
        const [logitsA, logitsB] = [take(Model.forward(a.model, ids).logits), take(Model.forward(b.model, ids).logits)]
        assert.isAtMost(maxAbsDiff(logitsA, logitsB), 1e-5 * Math.max(...logitsB.map(Math.abs)), `logits, ${JSON.stringify(targets)}`)
        assert.approximately(a.tie?.inputError ?? 0, b.tie?.inputError ?? 0, 1e-5)
        assert.approximately(a.tie?.outputError ?? 0, b.tie?.outputError ?? 0, 1e-5)
        Model.dispose(a.model)
        Model.dispose(b.model)
      }
      assert.strictEqual(tf.memory().numTensors, before, "no tensor left behind")
    }).pipe(onBackend("wasm")), { timeout: 120_000, arbitrary: { runs: 6 } })

  it.effect.prop("is saved as the one tensor on disk, byte for byte the unsplit model's checkpoint, and loads back", { split: Split }, ({ split }) =>
    Effect.gen(function*() {
      const { rows, whole, blocked } = yield* bothWays(split)
      const out = yield* tempDir
      for (const dtype of ["F32", "BF16"] as const) {
        const [a, b] = [path.join(out, `split-${dtype}`), path.join(out, `whole-${dtype}`)]
        yield* Pretrained.save(a, blocked, { dtype })
        yield* Pretrained.save(b, whole, { dtype })
        const bytes = (folder: string) => fs.readFile(path.join(folder, "model.safetensors"))
        const [saved, reference] = yield* Effect.promise(() => Promise.all([bytes(a), bytes(b)]))
        assert.isTrue(saved.equals(reference), `${dtype} checkpoints differ`)
      }
      // F32 back through blocks of the same size: the same tensors, the same logits.
      const back = yield* loadSplit(path.join(out, "split-F32"), rows)
      assert.deepStrictEqual([...Model.tensorsOfWeights(back.config, back.weights).keys()], [...Model.tensorsOfWeights(blocked.config, blocked.weights).keys()])
      assert.strictEqual(maxAbsDiff(take(Model.forward(back, ids).logits), take(Model.forward(whole, ids).logits)), 0)
    }).pipe(onBackend("wasm")), { timeout: 120_000, arbitrary: { runs: 6 } })

  it.effect("follows the backend's binding limit: blocks within it on load, logits past it refused before any work", () =>
    Effect.gen(function*() {
      // A GPU backend's device, as RowBlocks reads it, with a limit of 100 rows of 64 floats.
      const limit = 100 * 64 * 4
      const backend = tf.backend() as unknown as { device?: unknown }
      yield* Effect.acquireRelease(
        Effect.sync(() => (backend.device = { limits: { maxStorageBufferBindingSize: limit } })),
        () => Effect.sync(() => delete backend.device)
      )
      const model = yield* Pretrained.load(fixtures.untied)
      // 512 rows over at most 100 a block: six blocks, as even as they can be.
      assert.deepStrictEqual(model.weights.embed.map((block) => block.shape[0]), [86, 86, 86, 86, 86, 82])
      assert.deepStrictEqual(RowBlocks.rangesOf(model.weights.lmHead!).map(([start]) => start), [0, 86, 172, 258, 344, 430])
      const before = tf.memory().numTensors
      // 12 tokens of 512 logits fit in 25600 bytes, 13 do not.
      Model.forward(model, [ids[0].slice(0, 12)]).logits.dispose()
      const refused = yield* Effect.try({ try: () => Model.forward(model, [ids[0].slice(0, 13)]), catch: (error) => error as Error }).pipe(Effect.flip)
      assert.instanceOf(refused, LogitsTooLarge)
      assert.include(refused.message, "1 x 13 tokens x 512 vocabulary are 26624 bytes")
      assert.include(refused.message, "smaller micro-batch (at most 12 tokens)")
      assert.strictEqual(tf.memory().numTensors, before, "no tensor left behind")
    }).pipe(onBackend("wasm")))

  it.effect("resumes from a run's checkpoint: weights and moments back on the same blocks, bit for bit", () =>
    Effect.gen(function*() {
      const rows = 101
      const out = yield* tempDir
      const run = yield* Training.trainable(yield* loadSplit(fixtures.untied, rows))
      const adam = yield* Optimizer.make(run.variables, Optimizer.defaultConfig)
      yield* Training.step(run, adam, [undefined], lossOf, { learningRate, maxGradNorm: 1 })
      yield* RunFolder.saveCheckpoint(out, adam, { step: 1 }, (dir) => Pretrained.save(dir, run.model, { dtype: "F32" }))
      const saved = (yield* RunFolder.loadCheckpoint(out, Schema.Struct({ step: Schema.Int })))!
      const resumed = yield* withRows(rows, Training.startFrom(run.model, saved, Optimizer.defaultConfig.weightDecay))
      assert.deepStrictEqual([...resumed.trainable.variables.keys()], [...run.variables.keys()])
      assert.include([...run.variables.keys()], "lm_head.weight[505:512]")
      for (const [name, variable] of run.variables) {
        assert.strictEqual(maxAbsDiff(take(resumed.trainable.variables.get(name)!.clone()), take(variable.clone())), 0, name)
        assert.strictEqual(maxAbsDiff(take(resumed.adam.expAvgSq.get(name)!.clone()), take(adam.expAvgSq.get(name)!.clone())), 0, name)
      }
      assert.strictEqual(resumed.adam.step, 1)
    }).pipe(onBackend("wasm")))
})

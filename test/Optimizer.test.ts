import { assert, describe, it } from "@effect/vitest"
import * as tf from "@tensorflow/tfjs"
import { Effect } from "effect"
import * as Optimizer from "../src/train/Optimizer.ts"
import { maxAbsDiff, onBackend } from "./support.ts"

// A [2, 3] matrix and a [3] norm weight, four updates with these gradients and learning rates,
// betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on the matrix only.
const lrs = [0.01, 0.02, 0.015, 0.005]
const matrixGrads = [
  [0.1, -0.2, 0.0, 1.5, -0.3, 0.05],
  [-0.4, 0.1, 0.0, 0.2, 0.6, -0.05],
  [0.3, 0.3, 0.0, -1.0, 0.0, 0.01],
  [0.05, -0.5, 0.0, 0.7, -0.2, 0.02]
]
const vectorGrads = [[0.01, -0.02, 0.5], [0.03, 0.0, -0.5], [-0.02, 0.01, 0.25], [0.0, 0.04, -0.1]]

/**
 * What PyTorch 2.11's torch.optim.AdamW computed for the same problem (param groups with
 * weight_decay 0.1 and 0.0), after the first and the fourth update.
 */
const torch = {
  1: {
    matrix: [0.4895000159740448, -0.9890000224113464, 1.9980000257492065, 0.2397499978542328, -0.7392500042915344, 1.4884999990463257],
    vector: [0.9900000095367432, 0.9099999666213989, 1.090000033378601]
  },
  4: {
    matrix: [0.49780556559562683, -0.9841360449790955, 1.9900175333023071, 0.21967434883117676, -0.7480985522270203, 1.4818576574325562],
    matrixExpAvg: [0.006890001241117716, -0.02948000282049179, 0.0, 0.10554999858140945, 0.006729999557137489, 0.002495000371709466],
    matrixExpAvgSq: [0.012048689648509026, 0.0189410001039505, 0.0, 0.17025968432426453, 0.022103188559412956, 0.0002447343722451478],
    vector: [0.9669129848480225, 0.9241371750831604, 1.0880777835845947],
    vectorExpAvgSq: [6.389937334461138e-05, 0.00010189750173594803, 0.02546718530356884]
  }
}

const config: Optimizer.Config = { beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1, decayVectors: false }

const makeParams = () =>
  new Map<string, tf.Variable>([
    ["matrix", tf.variable(tf.tensor2d([[0.5, -1.0, 2.0], [0.25, -0.75, 1.5]]))],
    ["norm", tf.variable(tf.tensor1d([1.0, 0.9, 1.1]))]
  ])

const gradsAt = (step: number) =>
  new Map<string, tf.Tensor>([["matrix", tf.tensor2d(matrixGrads[step], [2, 3])], ["norm", tf.tensor1d(vectorGrads[step])]])

const applyStep = (adam: Optimizer.AdamW, step: number) => {
  const grads = gradsAt(step)
  Optimizer.update(adam, grads, lrs[step])
  tf.dispose([...grads.values()])
}

const values = (tensor: tf.Tensor) => Array.from(tensor.dataSync())

describe("Optimizer.update (AdamW)", () => {
  it.effect("matches torch.optim.AdamW step by step, decay skipping 1-D parameters", () =>
    Effect.gen(function*() {
      const params = makeParams()
      const adam = yield* Optimizer.make(params, config)
      const before = tf.memory().numTensors
      applyStep(adam, 0)
      assert.isAtMost(maxAbsDiff(values(params.get("matrix")!), torch[1].matrix), 1e-6)
      assert.isAtMost(maxAbsDiff(values(params.get("norm")!), torch[1].vector), 1e-6)
      for (const step of [1, 2, 3]) applyStep(adam, step)
      assert.strictEqual(adam.step, 4)
      assert.isAtMost(maxAbsDiff(values(params.get("matrix")!), torch[4].matrix), 1e-6)
      assert.isAtMost(maxAbsDiff(values(params.get("norm")!), torch[4].vector), 1e-6)
      assert.isAtMost(maxAbsDiff(values(adam.expAvg.get("matrix")!), torch[4].matrixExpAvg), 1e-6)
      assert.isAtMost(maxAbsDiff(values(adam.expAvgSq.get("matrix")!), torch[4].matrixExpAvgSq), 1e-6)
      assert.isAtMost(maxAbsDiff(values(adam.expAvgSq.get("norm")!), torch[4].vectorExpAvgSq), 1e-6)
      assert.strictEqual(tf.memory().numTensors, before, "updates leave no tensors behind")
      tf.dispose([...params.values()])
    }).pipe(onBackend("wasm")))

  it.effect("the state exports and imports bit for bit", () =>
    Effect.gen(function*() {
      const params = makeParams()
      const adam = yield* Optimizer.make(params, config)
      applyStep(adam, 0)
      applyStep(adam, 1)
      const state = yield* Optimizer.exportState(adam)
      assert.strictEqual(state.step, 2)
      // Resume on copies of the parameters; both then take the same third step.
      const copies = new Map([...params].map(([name, p]) => [name, tf.variable(tf.tensor(p.dataSync(), p.shape))]))
      const resumed = yield* Optimizer.make(copies, config, state)
      assert.deepStrictEqual(yield* Optimizer.exportState(resumed), state)
      applyStep(adam, 2)
      applyStep(resumed, 2)
      for (const name of params.keys()) {
        assert.deepStrictEqual(values(copies.get(name)!), values(params.get(name)!), name)
      }
      assert.deepStrictEqual(yield* Optimizer.exportState(resumed), yield* Optimizer.exportState(adam))
      tf.dispose([...params.values(), ...copies.values()])
    }).pipe(onBackend("wasm")))

  it.effect("a state that does not fit the parameters is an error", () =>
    Effect.gen(function*() {
      const params = makeParams()
      const zeros = (n: number) => new Float32Array(n)
      const good = { expAvg: new Map([["matrix", zeros(6)], ["norm", zeros(3)]]), expAvgSq: new Map([["matrix", zeros(6)], ["norm", zeros(3)]]) }
      const wrongSize = yield* Effect.flip(Optimizer.make(params, config, { ...good, step: 1, expAvg: new Map([["matrix", zeros(5)], ["norm", zeros(3)]]) }))
      assert.include(wrongSize.message, "exp_avg of matrix has 5 values")
      const missing = yield* Effect.flip(Optimizer.make(params, config, { ...good, step: 1, expAvgSq: new Map([["matrix", zeros(6)]]) }))
      assert.include(missing.message, "exp_avg_sq of norm is missing")
      const extra = yield* Effect.flip(Optimizer.make(params, config, { ...good, step: 1, expAvg: new Map([...good.expAvg, ["other", zeros(1)]]) }))
      assert.include(extra.message, "exp_avg of other names no parameter")
      tf.dispose([...params.values()])
    }).pipe(onBackend("wasm")))
})

describe("Optimizer.learningRate", () => {
  const schedule: Optimizer.Schedule = { peak: 1e-3, min: 1e-4, warmupSteps: 10, totalSteps: 110 }
  it("warms up linearly, peaks, decays on a cosine to the minimum and stays there", () => {
    assert.approximately(Optimizer.learningRate(schedule, 0), 1e-4, 1e-12)
    assert.approximately(Optimizer.learningRate(schedule, 4), 5e-4, 1e-12)
    assert.approximately(Optimizer.learningRate(schedule, 9), 1e-3, 1e-12)
    assert.approximately(Optimizer.learningRate(schedule, 10), 1e-3, 1e-12)
    // Half way through the decay the cosine is at 0: the mean of peak and minimum.
    assert.approximately(Optimizer.learningRate(schedule, 60), 5.5e-4, 1e-12)
    assert.approximately(Optimizer.learningRate(schedule, 35), 1e-4 + 0.5 * 9e-4 * (1 + Math.cos(Math.PI / 4)), 1e-12)
    assert.approximately(Optimizer.learningRate(schedule, 110), 1e-4, 1e-12)
    assert.approximately(Optimizer.learningRate(schedule, 500), 1e-4, 1e-12)
  })
})

import { assert, describe, it } from "@effect/vitest"
import * as tf from "@tensorflow/tfjs"
import { Effect, Schema } from "effect"
import { matMul } from "../src/model/MatMul.ts"
import * as Random from "../src/Random.ts"
import * as Loss from "../src/train/Loss.ts"
import { keepMetrics, maxAbsDiff, onBackend, readMetrics } from "./support.ts"

// Float64 references, written out as a reader would check them by hand.
const softmax = (logits: ReadonlyArray<number>, temperature = 1) => {
  const max = Math.max(...logits)
  const exps = logits.map((z) => Math.exp((z - max) / temperature))
  const sum = exps.reduce((a, b) => a + b, 0)
  return exps.map((e) => e / sum)
}
const kl = (p: ReadonlyArray<number>, q: ReadonlyArray<number>) =>
  p.reduce((sum, pi, i) => (pi === 0 ? sum : sum + pi * (Math.log(pi) - Math.log(q[i]))), 0)

interface Case {
  /** [B][T][Vs] student logits. */
  readonly student: ReadonlyArray<ReadonlyArray<ReadonlyArray<number>>>
  readonly teacher:
    | { readonly full: ReadonlyArray<ReadonlyArray<ReadonlyArray<number>>> } // [B][T][Vt] log-probabilities
    | { readonly ids: ReadonlyArray<ReadonlyArray<ReadonlyArray<number>>>; readonly logProbs: ReadonlyArray<ReadonlyArray<ReadonlyArray<number>>> }
  readonly mask?: ReadonlyArray<ReadonlyArray<number>>
  readonly targets?: ReadonlyArray<ReadonlyArray<number>>
  readonly crossEntropyMask?: ReadonlyArray<ReadonlyArray<number>>
  readonly options?: Partial<Loss.Options>
}

const teacherOf = (teacher: Case["teacher"]): Loss.Teacher =>
  "full" in teacher
    ? { _tag: "Full", logProbs: tf.tensor3d(teacher.full as Array<Array<Array<number>>>) }
    : {
      _tag: "TopK",
      ids: tf.tensor3d(teacher.ids as Array<Array<Array<number>>>, undefined, "int32"),
      logProbs: tf.tensor3d(teacher.logProbs as Array<Array<Array<number>>>)
    }

/** Loss, metrics and the gradient w.r.t. the student logits of one case; leaves no tensors behind. */
const run = (c: Case) =>
  Effect.gen(function*() {
    const [b, t, v] = [c.student.length, c.student[0].length, c.student[0][0].length]
    const options = { ...Loss.defaultOptions, ...c.options }
    const mask = c.mask ?? Array.from({ length: b }, () => new Array(t).fill(1))
    const batch = { mask, targets: c.targets ?? Array.from({ length: b }, () => new Array(t).fill(0)), crossEntropyMask: c.crossEntropyMask }
    const before = tf.memory().numTensors
    const teacher = teacherOf(c.teacher)
    const logits = tf.tensor3d(c.student as Array<Array<Array<number>>>)
    const out = yield* Effect.scoped(Effect.gen(function*() {
      const target = yield* Loss.teacherTarget(teacher, v, mask, options)
      let metrics: Loss.Distillation | undefined
      const { value, grads } = tf.valueAndGrads((z) => {
        metrics = Loss.distillation(z as tf.Tensor3D, target, batch, options)
        keepMetrics(metrics.metrics)
        return metrics.loss
      })([logits])
      const result = { tokens: metrics!.tokens, metrics: readMetrics(metrics!.metrics), loss: value.dataSync()[0], grad: Array.from(grads[0].dataSync()) }
      tf.dispose([value, ...grads])
      return result
    })).pipe(Effect.ensuring(Effect.sync(() => tf.dispose([logits, ...Object.values(teacher).filter((x) => x instanceof tf.Tensor)]))))
    assert.strictEqual(tf.memory().numTensors, before, "no tensors left behind")
    return out
  })

const close = (actual: number, expected: number, message?: string) => assert.approximately(actual, expected, 1e-5, message)

describe("Loss.distillation", () => {
  it.effect("full vocabulary: KL against a hand-computed value", () =>
    Effect.gen(function*() {
      // teacher (1/2, 1/2), student (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3).
      const out = yield* run({ student: [[[0, Math.log(3)]]], teacher: { full: [[[Math.log(0.5), Math.log(0.5)]]] } })
      close(out.metrics.kl, 0.5 * Math.log(4 / 3))
      close(out.loss, out.metrics.kl)
      assert.strictEqual(out.tokens, 1)
    }).pipe(onBackend("wasm")))

  it.effect("the mean runs over the tokens the mask keeps", () =>
    Effect.gen(function*() {
      const student = [[[0, Math.log(3)], [5, -5]], [[1, 1], [2, 0]]]
      const teacher = [[[Math.log(0.5), Math.log(0.5)], [Math.log(0.9), Math.log(0.1)]], [[Math.log(0.2), Math.log(0.8)], [Math.log(0.5), Math.log(0.5)]]]
      const out = yield* run({ student, teacher: { full: teacher }, mask: [[1, 0], [1, 0]] })
      const expected = (kl([0.5, 0.5], softmax(student[0][0])) + kl([0.2, 0.8], softmax(student[1][0]))) / 2
      close(out.metrics.kl, expected)
      assert.strictEqual(out.tokens, 2)
      assert.isAtMost(maxAbsDiff(out.grad.slice(2, 4), [0, 0]), 0, "no gradient through a masked position")
    }).pipe(onBackend("wasm")))

  it.effect("top-k is renormalised over its k ids and compared with the student's full softmax", () =>
    Effect.gen(function*() {
      // teacher top-2 of 4: id 2 at 0.6, id 0 at 0.2 -> 0.75, 0.25 on ids 2, 0 and 0 elsewhere.
      const student = [1, -1, 2, 0.5]
      const out = yield* run({
        student: [[student]],
        teacher: { ids: [[[2, 0]]], logProbs: [[[Math.log(0.6), Math.log(0.2)]]] }
      })
      close(out.metrics.kl, kl([0.25, 0, 0.75, 0], softmax(student)))
    }).pipe(onBackend("wasm")))

  it.effect("top-k with a rest bucket is a (k+1)-way KL", () =>
    Effect.gen(function*() {
      const student = [1, -1, 2, 0.5]
      const s = softmax(student)
      const out = yield* run({
        student: [[student]],
        teacher: { ids: [[[2, 0]]], logProbs: [[[Math.log(0.6), Math.log(0.2)]]] },
        options: { restBucket: true }
      })
      close(out.metrics.kl, kl([0.6, 0.2, 0.2], [s[2], s[0], s[1] + s[3]]))
    }).pipe(onBackend("wasm")))

  it.effect("temperature softens both sides and scales the loss by T^2", () =>
    Effect.gen(function*() {
      const student = [1, -1, 2, 0.5]
      const teacher = [0.1, 0.2, 0.3, 0.4].map(Math.log)
      const out = yield* run({ student: [[student]], teacher: { full: [[teacher]] }, options: { temperature: 2 } })
      const expected = kl(softmax(teacher, 2), softmax(student, 2))
      close(out.metrics.kl, expected)
      close(out.loss, 4 * expected)
      // With a rest bucket the k+1 categories are softened as they stand.
      const rest = yield* run({
        student: [[student]],
        teacher: { ids: [[[2, 0]]], logProbs: [[[Math.log(0.6), Math.log(0.2)]]] },
        options: { temperature: 2, restBucket: true }
      })
      const s = softmax(student)
      close(rest.metrics.kl, kl(softmax([0.6, 0.2, 0.2].map(Math.log), 2), softmax([s[2], s[0], s[1] + s[3]].map(Math.log), 2)))
    }).pipe(onBackend("wasm")))

  it.effect("cross-entropy weight: loss = KL + w CE, CE at temperature 1", () =>
    Effect.gen(function*() {
      const student = [1, -1, 2, 0.5]
      const teacher = [0.1, 0.2, 0.3, 0.4].map(Math.log)
      const out = yield* run({
        student: [[student]],
        teacher: { full: [[teacher]] },
        targets: [[3]],
        options: { crossEntropyWeight: 0.5, temperature: 2 }
      })
      const ce = -Math.log(softmax(student)[3])
      close(out.metrics.ce, ce)
      close(out.loss, 4 * kl(softmax(teacher, 2), softmax(student, 2)) + 0.5 * ce)
    }).pipe(onBackend("wasm")))

  it.effect("the KL runs over the mask and the cross-entropy over its own: a last token has a teacher but no next token", () =>
    Effect.gen(function*() {
      const students = [[1, -1, 2, 0.5], [0, 0.3, -0.2, 1]]
      const teachers = [[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]].map((p) => p.map(Math.log))
      const out = yield* run({
        student: [students],
        teacher: { full: [teachers] },
        targets: [[2, 0]],
        crossEntropyMask: [[1, 0]],
        options: { crossEntropyWeight: 0.5 }
      })
      const kls = students.map((z, i) => kl(softmax(teachers[i]), softmax(z)))
      const ce = -Math.log(softmax(students[0])[2])
      assert.strictEqual(out.tokens, 2)
      close(out.metrics.kl, (kls[0] + kls[1]) / 2)
      close(out.metrics.ce, ce)
      close(out.loss, (kls[0] + kls[1]) / 2 + 0.5 * ce)
    }).pipe(onBackend("wasm")))

  it.effect("vocabularies are aligned on their common prefix", () =>
    Effect.gen(function*() {
      const student = [1, -1, 2, 0.5]
      // A teacher with 2 padding rows of negligible mass: renormalised over the first 4 ids.
      const padded = [0.1, 0.2, 0.3, 0.3995, 0.0004, 0.0001]
      const wider = yield* run({ student: [[student]], teacher: { full: [[padded.map(Math.log)]] } })
      close(wider.metrics.kl, kl(softmax(padded.slice(0, 4).map(Math.log)), softmax(student)))
      // A student with 2 more rows than the teacher: its softmax is taken over the first 4.
      const teacher = [0.1, 0.2, 0.3, 0.4]
      const narrower = yield* run({ student: [[[...student, 3, -2]]], teacher: { full: [[teacher.map(Math.log)]] } })
      close(narrower.metrics.kl, kl(teacher, softmax(student)))
      assert.deepStrictEqual(narrower.grad.slice(4), [0, 0])
      // A top-k id beyond the student's vocabulary with negligible mass is dropped.
      const topK = yield* run({
        student: [[student]],
        teacher: { ids: [[[2, 0, 5]]], logProbs: [[[Math.log(0.6), Math.log(0.2), Math.log(0.0005)]]] },
        options: { restBucket: true }
      })
      const s = softmax(student)
      const rest = 1 - 0.6 - 0.2 - 0.0005
      close(topK.metrics.kl, kl([0.6, 0.2, rest].map((p) => p / (1 - 0.0005)), [s[2], s[0], s[1] + s[3]]))
    }).pipe(onBackend("wasm")))

  it.effect("a teacher with real mass outside the student's vocabulary is an error", () =>
    Effect.gen(function*() {
      const student = [[[1, -1, 2, 0.5]]]
      const topK = yield* Effect.flip(run({ student, teacher: { ids: [[[2, 7]]], logProbs: [[[Math.log(0.6), Math.log(0.2)]]] } }))
      assert.strictEqual(topK._tag, "TeacherVocabularyError")
      close(topK.mass, 0.2)
      const full = yield* Effect.flip(run({ student, teacher: { full: [[[0.1, 0.2, 0.3, 0.3, 0.1].map(Math.log)]] } }))
      close(full.mass, 0.1)
      // Unless that position is padding.
      const masked = yield* run({
        student: [[[1, -1, 2, 0.5], [0, 0, 0, 0]]],
        teacher: { ids: [[[2, 0], [7, 1]]], logProbs: [[[Math.log(0.6), Math.log(0.2)], [Math.log(0.9), Math.log(0.1)]]] },
        mask: [[1, 0]]
      })
      assert.strictEqual(masked.tokens, 1)
    }).pipe(onBackend("wasm")))
})

describe("Loss.distillation gradient", () => {
  it.effect("is T (softmax(z/T) - p_teacher) / tokens per kept token", () =>
    Effect.gen(function*() {
      const student = [[[1, -1, 2, 0.5], [0.3, 0.1, -0.4, 2]], [[-2, 0, 1, 1], [4, 4, 4, 4]]]
      const teacher = [[[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]], [[0.25, 0.25, 0.4, 0.1], [0.5, 0.2, 0.2, 0.1]]]
      const mask = [[1, 1], [1, 0]]
      for (const temperature of [1, 2]) {
        const out = yield* run({ student, teacher: { full: teacher.map((row) => row.map((p) => p.map(Math.log))) }, mask, options: { temperature } })
        const expected = student.flatMap((row, i) =>
          row.flatMap((z, j) => {
            const s = softmax(z, temperature)
            const q = softmax(teacher[i][j].map(Math.log), temperature)
            return s.map((si, v) => (mask[i][j] * temperature * (si - q[v])) / 3)
          })
        )
        assert.isAtMost(maxAbsDiff(out.grad, expected), 1e-6, `T = ${temperature}`)
      }
    }).pipe(onBackend("wasm")))

  it.effect("with a rest bucket is softmax(z) - p_teacher on the top-k and p_s (1 - r_t / r_s) elsewhere", () =>
    Effect.gen(function*() {
      const student = [1, -1, 2, 0.5]
      const out = yield* run({
        student: [[student]],
        teacher: { ids: [[[2, 0]]], logProbs: [[[Math.log(0.6), Math.log(0.2)]]] },
        options: { restBucket: true }
      })
      const s = softmax(student)
      const restRatio = 0.2 / (s[1] + s[3])
      assert.isAtMost(maxAbsDiff(out.grad, [s[0] - 0.2, s[1] * (1 - restRatio), s[2] - 0.6, s[3] * (1 - restRatio)]), 1e-6)
    }).pipe(onBackend("wasm")))
})

const Logit = Schema.Finite.check(Schema.isBetween({ minimum: -8, maximum: 8 }))
const Logits = Schema.Array(Logit).check(Schema.isBetweenLength(6, 6))

describe("Loss.distillation properties", () => {
  it.effect.prop("KL of identical distributions is 0 and KL >= 0 otherwise", { a: Logits, b: Logits }, ({ a, b }) =>
    Effect.gen(function*() {
      const logSoftmax = (z: ReadonlyArray<number>) => softmax(z).map(Math.log)
      const same = yield* run({ student: [[a]], teacher: { full: [[logSoftmax(a)]] } })
      assert.isAtMost(Math.abs(same.metrics.kl), 1e-5)
      const other = yield* run({ student: [[a]], teacher: { full: [[logSoftmax(b)]] } })
      assert.isAtLeast(other.metrics.kl, -1e-6)
      assert.approximately(other.metrics.kl, kl(softmax(b), softmax(a)), 1e-4)
    }).pipe(onBackend("wasm")), { arbitrary: { runs: 30 } })
})

const Shape = Schema.Struct({
  seed: Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 1_000_000 })),
  rows: Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 3 })),
  tokens: Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 6 })),
  hidden: Schema.Int.check(Schema.isBetween({ minimum: 2, maximum: 9 })),
  // Blocks of at least 2 rows: tf.oneHot (the cross-entropy) needs a depth of 2 or more.
  blocks: Schema.Array(Schema.Int.check(Schema.isBetween({ minimum: 2, maximum: 7 }))).check(Schema.isBetweenLength(1, 3)),
  chunkRows: Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 7 })),
  teacher: Schema.Literals(["full", "narrower", "topk", "rest"]),
  temperature: Schema.Literals([1, 2]),
  crossEntropyWeight: Schema.Literals([0, 0.5])
})

describe("Loss.chunkedDistillation", () => {
  it.effect.prop("equals distillation of the whole logits in loss, metrics and the gradients of the hidden states and every head block", { shape: Shape }, ({ shape }) =>
    Effect.gen(function*() {
      const next = Random.uniform(shape.seed)
      const normal = (dims: Array<number>) => tf.tensor(Float32Array.from({ length: dims.reduce((a, b) => a * b, 1) }, () => 2 * (next() + next() + next() - 1.5)), dims)
      const { rows: b, tokens: t, hidden: d } = shape
      const vocab = shape.blocks.reduce((a, c) => a + c, 0)
      const before = tf.memory().numTensors
      const hidden = normal([b, t, d]) as tf.Tensor3D
      const head = shape.blocks.map((rows) => normal([rows, d]) as tf.Tensor2D)
      const mask = Array.from({ length: b }, () => Array.from({ length: t }, () => (next() < 0.8 ? 1 : 0)))
      const targets = Array.from({ length: b }, () => Array.from({ length: t }, () => Math.floor(next() * vocab)))
      // Fewer ids than the vocabulary: a rest bucket with no ids left has no student mass to compare.
      const k = Math.min(3, vocab - 1)
      const teacher: Loss.Teacher = shape.teacher === "full" || shape.teacher === "narrower"
        ? { _tag: "Full", logProbs: tf.tidy(() => tf.logSoftmax(normal([b, t, shape.teacher === "full" ? vocab : vocab - 1])) as tf.Tensor3D) }
        : {
          _tag: "TopK",
          ids: tf.tensor3d(Int32Array.from({ length: b * t * k }, (_, i) => (i % k) * Math.max(1, Math.floor(vocab / k))), [b, t, k], "int32"),
          logProbs: tf.tensor3d(Float32Array.from({ length: b * t * k }, (_, i) => Math.log(0.5 / (1 + (i % k)))), [b, t, k])
        }
      const options = { ...Loss.defaultOptions, temperature: shape.temperature, crossEntropyWeight: shape.crossEntropyWeight, restBucket: shape.teacher === "rest" }
      const batch = { mask, targets }
      const outcome = (lossOf: (h: tf.Tensor3D, blocks: Array<tf.Tensor2D>, target: Loss.Target) => Loss.Distillation) =>
        Effect.scoped(Effect.gen(function*() {
          const target = yield* Loss.teacherTarget(teacher, vocab, mask, options)
          let result: Loss.Distillation | undefined
          const { value, grads } = tf.valueAndGrads((...inputs: Array<tf.Tensor>) => {
            result = lossOf(inputs[0] as tf.Tensor3D, inputs.slice(1) as Array<tf.Tensor2D>, target)
            keepMetrics(result.metrics)
            return result.loss
          })([hidden, ...head])
          const out = { loss: value.dataSync()[0], metrics: readMetrics(result!.metrics), grads: grads.map((g) => Float32Array.from(g.dataSync())) }
          tf.dispose([value, ...grads])
          return out
        }))
      const whole = yield* outcome((h, blocks, target) =>
        Loss.distillation(tf.concat(blocks.map((block) => matMul(h.reshape([b * t, d]), block, false, true)), -1).reshape([b, t, vocab]), target, batch, options))
      const chunked = yield* outcome((h, blocks, target) => Loss.chunkedDistillation(h, blocks, target, batch, options, shape.chunkRows))
      tf.dispose([hidden, ...head, ...Object.values(teacher).filter((x) => x instanceof tf.Tensor)])
      assert.approximately(chunked.loss, whole.loss, 1e-5)
      assert.approximately(chunked.metrics.kl, whole.metrics.kl, 1e-5)
      assert.approximately(chunked.metrics.ce, whole.metrics.ce, 1e-5)
      whole.grads.forEach((grad, i) => assert.isAtMost(maxAbsDiff(chunked.grads[i], grad), 1e-5, i === 0 ? "hidden" : `head block ${i - 1}`))
      assert.strictEqual(tf.memory().numTensors, before, "no tensors left behind")
    }).pipe(onBackend("wasm")), { arbitrary: { runs: 40 } })
})

describe("Loss.chunkedDistillation outside a gradient tape", () => {
  it.effect("leaves no tensor behind once its loss and metrics are disposed, and refuses chunks past one binding", () =>
    Effect.gen(function*() {
      const before = tf.memory().numTensors
      const hidden = tf.randomNormal([2, 3, 4], 0, 1, "float32", 1) as tf.Tensor3D
      const head = [tf.randomNormal([5, 4], 0, 1, "float32", 2) as tf.Tensor2D, tf.randomNormal([4, 4], 0, 1, "float32", 3) as tf.Tensor2D]
      const teacher: Loss.Teacher = { _tag: "Full", logProbs: tf.tidy(() => tf.logSoftmax(tf.randomNormal([2, 3, 9], 0, 1, "float32", 4))) as tf.Tensor3D }
      const batch = { mask: [[1, 1, 1], [1, 1, 0]], targets: [[1, 2, 3], [4, 5, 6]] }
      const options = { ...Loss.defaultOptions, crossEntropyWeight: 0.5 }
      yield* Effect.scoped(Effect.gen(function*() {
        const target = yield* Loss.teacherTarget(teacher, 9, batch.mask, options)
        const result = Loss.chunkedDistillation(hidden, head, target, batch, options, 4)
        const logits = tf.tidy(() => tf.concat(head.map((block) => matMul(hidden.reshape([6, 4]), block, false, true)), -1).reshape([2, 3, 9])) as tf.Tensor3D
        const whole = Loss.distillation(logits, target, batch, options)
        assert.approximately(result.loss.dataSync()[0], whole.loss.dataSync()[0], 1e-5)
        tf.dispose([logits, result.loss, result.metrics.kl, result.metrics.ce, whole.loss, whole.metrics.kl, whole.metrics.ce])
        // A GPU backend's device as RowBlocks reads it, binding at most 100 bytes: 5 tokens x 9 ids x 4 bytes are past it.
        const backend = tf.backend() as unknown as { device?: unknown }
        backend.device = { limits: { maxStorageBufferBindingSize: 100 } }
        try {
          assert.throws(() => Loss.chunkedDistillation(hidden, head, target, batch, options, 5), /past the backend's largest storage binding/)
        } finally {
          delete backend.device
        }
      }))
      tf.dispose([hidden, ...head, teacher.logProbs])
      assert.strictEqual(tf.memory().numTensors, before)
    }).pipe(onBackend("wasm")))
})

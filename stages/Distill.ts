/**
 * Distillation: trains a student to match a teacher's next-token distributions with forward KL
 * (RECIPE.md section 2), over packed rows of a data set in a seeded order, with AdamW, warmup then
 * cosine, clipping and gradient accumulation. The teacher is any source of the `Teacher` service.
 *
 * OUT holds `metrics.jsonl` (a line per step), `checkpoint/` every `saveEvery` steps (weights,
 * optimizer moments and the data position, swapped in atomically) and, at the end, the student as
 * an ordinary Hugging Face checkpoint. A killed run given the same options resumes from its last
 * checkpoint and ends where an uninterrupted run ends: same data order, same updates.
 */
import * as tf from "@tensorflow/tfjs"
import { Effect, Schema, Stream } from "effect"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import * as Checkpoint from "../src/io/Checkpoint.ts"
import * as Config from "../src/model/Config.ts"
import * as Dataset from "../src/data/Dataset.ts"
import * as Images from "../src/data/Images.ts"
import * as ImageSide from "../src/data/ImageSide.ts"
import { CheckpointError, DataError } from "../src/Errors.ts"
import * as Files from "../src/io/Files.ts"
import * as Loss from "../src/train/Loss.ts"
import * as Model from "../src/model/Model.ts"
import * as Optimizer from "../src/train/Optimizer.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Vision from "../src/model/Vision.ts"
import type { FloatDtype } from "../src/io/Safetensors.ts"
import * as Random from "../src/Random.ts"
import * as RunFolder from "../src/train/RunFolder.ts"
import { type Batch, type Output, Teacher, toLossTeacher } from "../src/train/Teacher.ts"
import type { Tokenizer } from "../src/io/Tokenizer.ts"
import * as Training from "../src/train/Training.ts"

export interface DistillOptions extends Training.SupervisedOptions {
  readonly studentDir: string
  readonly data: string
  readonly loss: Loss.Options
  /** Long-context phase: the student becomes a Ministral 3 with YaRN and query scaling (`Config.longContext`). */
  readonly yarn?: Config.LongContext | undefined
  readonly tokenizer?: Tokenizer | undefined
  /** Dtype of the written model; the student's by default. */
  readonly dtype?: FloatDtype | undefined
  /** Each document of a packed row on its own, for the student and the teacher alike (`Dataset.documentMaskByDefault` when left out). */
  readonly documentMask?: boolean | undefined
  /** Rows the seeded shuffle permutes at a time. */
  readonly shuffleWindow?: number
  readonly onStep?: (metrics: StepMetrics) => void
}

export interface StepMetrics {
  readonly step: number
  readonly loss: number
  readonly kl: number
  readonly ce: number
  readonly lr: number
  readonly grad_norm: number
  readonly tokens: number
  readonly tokens_per_s: number
  readonly epoch: number
}

const State = Schema.Struct({
  format: Schema.Literal("cascade-distill/1"),
  step: Schema.Int,
  /** Packed rows consumed in the seeded order. */
  rows: Schema.Int,
  /** What must be the same to resume or to find the run finished: student, data, teacher and every option that shapes the result. */
  identity: Schema.String,
  complete: Schema.Boolean
})
type State = typeof State.Type

const io = (file: string, what: string) => (cause: unknown) => new CheckpointError({ file, reason: `${what} (${String(cause)})` })

/**
 * Packed rows in a seeded order, epoch after epoch: the rows of each window of `window` rows are
 * permuted by a generator seeded with (seed, epoch, window index). `index` is the row's position in
 * the packed data set, which teacher caches are keyed by.
 */
export const seededRows = (
  file: string,
  options: { readonly vocabSize: number; readonly tokenizer?: Tokenizer | undefined; readonly seq: number; readonly seed: number; readonly window: number },
  side: ImageSide.ImageSide | undefined
) => {
  const epoch = (n: number) =>
    ImageSide.packable(file, options, side).pipe(
      Dataset.pack(options.seq),
      Stream.zipWithIndex,
      Stream.grouped(options.window),
      Stream.zipWithIndex,
      Stream.flatMap(([window, w]) => {
        const next = Random.uniform(Math.imul(options.seed + 1, 0x9e3779b1) ^ Math.imul(n + 1, 0x85ebca6b) ^ (w + 1))
        return Stream.fromIterable(Random.permutation(window.length, next).map((i) => ({ row: window[i][0], index: window[i][1], epoch: n })))
      })
    )
  return Stream.flatMap(Stream.iterate(0, (n) => n + 1), epoch)
}

/** Runs (or resumes, or finds finished) a distillation; returns the final state. */
export const distill = Effect.fn("Distill.distill")(function*(options: DistillOptions) {
  const teacher = yield* Teacher
  const { out, seq } = options
  yield* Effect.tryPromise({ try: () => fs.mkdir(out, { recursive: true }), catch: io(out, "cannot create folder") })

  const loaded = yield* Pretrained.load(options.studentDir)
  const config = options.yarn ? Config.longContext(loaded.config, options.yarn) : loaded.config
  const student = Model.make(config, loaded.weights)
  const shuffleWindow = options.shuffleWindow ?? 1024
  const documentMask = options.documentMask ?? Dataset.documentMaskByDefault
  const identity = JSON.stringify({
    student: yield* Checkpoint.fingerprint(options.studentDir),
    data: yield* Files.sha256(options.data),
    teacher: teacher.describe,
    ...Training.supervisedIdentity(options),
    loss: options.loss,
    yarn: options.yarn,
    shuffleWindow,
    dtype: options.dtype,
    documentMask
  })

  const { finished, resume } = yield* RunFolder.startingPoint(out, State, {
    identity,
    resume: options.resume,
    replace: options.replace,
    differs: "options, data, student or teacher"
  })
  if (finished !== undefined) return finished
  const { trainable, adam } = yield* Training.startFrom(student, resume, options.weightDecay)
  let step = resume?.state.step ?? 0
  let rows = resume?.state.rows ?? 0
  yield* RunFolder.truncateMetrics(out, step)

  const schedule = Training.scheduleOf(options)
  const side = yield* ImageSide.of(options.studentDir, options.tokenizer)
  const firstEpoch = yield* ImageSide.packable(options.data, { vocabSize: config.vocabSize, tokenizer: options.tokenizer, seq }, side).pipe(
    Dataset.pack(seq),
    Stream.runCount
  )
  if (firstEpoch === 0) return yield* new DataError({ file: options.data, reason: "holds no tokens to train on" })

  const state = (complete: boolean): State => ({ format: "cascade-distill/1", step, rows, identity, complete })
  const batches: Stream.Stream<Batch, DataError | Images.ImageError> = seededRows(options.data, {
    vocabSize: config.vocabSize,
    tokenizer: options.tokenizer,
    seq,
    seed: options.seed,
    window: shuffleWindow
  }, side).pipe(
    Stream.drop(rows),
    Stream.grouped(options.batch),
    Stream.map((group) => ({ rows: group.map((g) => g.row), indices: group.map((g) => g.index), documentMask }))
  )

  yield* teacher.annotate(batches).pipe(
    Stream.grouped(options.accumulate),
    Stream.take(options.steps - step),
    Stream.runForEach((microBatches) =>
      Effect.gen(function*() {
        const started = performance.now()
        const prepared = yield* Effect.forEach(microBatches, ({ batch, teacher: output }) => microBatch(batch, output, config.vocabSize, options.loss, side))
        const result = yield* Training.step(trainable, adam, prepared, lossOf(options.loss, options.headChunk), {
          learningRate: Optimizer.learningRate(schedule, step),
          maxGradNorm: options.maxGradNorm
        })
        step++
        rows += microBatches.reduce((n, { batch }) => n + batch.rows.length, 0)
        const metrics: StepMetrics = {
          step,
          loss: result.loss,
          kl: result.metrics.kl,
          ce: result.metrics.ce,
          lr: result.learningRate,
          grad_norm: result.gradNorm,
          tokens: result.tokens,
          tokens_per_s: result.tokens / ((performance.now() - started) / 1000),
          epoch: Math.floor((rows - 1) / firstEpoch)
        }
        yield* RunFolder.recordStep(out, options, step, metrics, {
          adam,
          state: () => state(false),
          writeWeights: (dir) => Pretrained.save(dir, trainable.model, { dtype: "F32" })
        })
      }).pipe(Effect.scoped)
    )
  )

  // A Mistral 3 model's image side, untouched by text training, saved with it: the output stays whole.
  yield* Pretrained.save(out, trainable.model, { dtype: options.dtype ?? Pretrained.storedDtype(loaded.config), companionsFrom: options.studentDir, vision: yield* Vision.loadIfPresent(options.studentDir) })
  const done = state(true)
  yield* Files.writeJson(path.join(out, "state.json"), done)
  yield* RunFolder.removeCheckpoint(out)
  return done
})

interface MicroBatch {
  readonly ids: Array<Array<number>>
  /** How the model reads the rows: padding, the documents' starts with document masking, the rows' images. */
  readonly masks: Loss.ForwardInputs
  /**
   * Positions the KL counts: every real token. The teacher's distribution after the row's last one
   * is as valid as any (no next token is needed), and every source gives it: in process from the
   * logits there, the cache stores it, the remote source asks for one token past the row. A
   * position before an image token is not counted: the image is input, not a prediction.
   */
  readonly mask: Array<Array<number>>
  /** Positions the cross-entropy counts: real tokens with a next text token in the row (the last has none). */
  readonly crossEntropyMask: Array<Array<number>>
  readonly targets: Array<Array<number>>
  readonly target: Loss.Target
}

/**
 * A batch and its teacher output as the loss consumes them; the target's tensors and the rows'
 * image features (the student's own, its image side frozen) live with the scope.
 */
const microBatch = Effect.fnUntraced(function*(batch: Batch, output: Output, vocab: number, loss: Loss.Options, side: ImageSide.ImageSide | undefined) {
  const t = batch.rows[0].ids.length
  const ids = batch.rows.map((row) => [...row.ids])
  const rowMasks = Dataset.rowMasks(batch.rows, batch.documentMask ?? false)
  const seeing = side !== undefined && batch.rows.some((row) => (row.images?.length ?? 0) > 0)
  const predicted = (row: Dataset.PackedRow, i: number) => !seeing || !Images.isImageToken(side.tokens, row.ids[i + 1])
  const mask = batch.rows.map((row) => Array.from({ length: t }, (_, i) => (i < row.length && (i === row.length - 1 || predicted(row, i)) ? 1 : 0)))
  const crossEntropyMask = batch.rows.map((row) => Array.from({ length: t }, (_, i) => (i < row.length - 1 && predicted(row, i) ? 1 : 0)))
  const targets = ids.map((row) => row.map((_, i) => row[i + 1] ?? 0))
  const masks: Loss.ForwardInputs = { ...rowMasks, imageFeatures: yield* ImageSide.rowFeatures(batch.rows, side) }
  const teacher = toLossTeacher(output, batch.rows.length, t)
  const target = yield* Loss.teacherTarget(teacher, vocab, mask, loss).pipe(
    Effect.ensuring(Effect.sync(() => tf.dispose(teacher._tag === "Full" ? [teacher.logProbs] : [teacher.ids, teacher.logProbs])))
  )
  return { ids, masks, mask, crossEntropyMask, targets, target } satisfies MicroBatch
})

const lossOf = (options: Loss.Options, headChunk: number | undefined) => (model: Model.Model, batch: MicroBatch) =>
  Loss.ofModel(model, batch.ids, batch.masks, batch.target, batch, options, headChunk)

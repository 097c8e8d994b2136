/**
 * Supervised fine-tuning (RECIPE.md sections 3 and 4): trains a model on chat data with the loss on
 * assistant tokens only (src/data/ChatData.ts marks them): their cross-entropy, optionally mixed with or
 * replaced by forward-KL logit distillation from a teacher on the same tokens,
 * `loss = (1 - w) CE + w KL`. The teacher is a source of the `Teacher` service, needed only when
 * w > 0: a checkpoint run in process or a vLLM-compatible server (an offline cache holds the rows
 * `Dataset.pack` makes of text data, not these chat rows, and refuses this data).
 *
 * Training is stages/Distill.ts's: AdamW with warmup then cosine, gradient accumulation, clipping.
 * OUT holds `metrics.jsonl` (a line per step), `checkpoint/` every `saveEvery` steps (weights,
 * optimizer moments and the data position, swapped in atomically) and, at the end, the model as an
 * ordinary Hugging Face checkpoint with its tokenizer. A killed run given the same options resumes
 * from its last checkpoint and ends where an uninterrupted run ends: same data order, same updates.
 *
 * Data: the conversations are tokenized and packed once and held in memory (chat sets are small next
 * to pretraining data); each epoch visits every row, in a permutation seeded by (seed, epoch).
 */
import * as tf from "@tensorflow/tfjs"
import { Effect, Option, Schema, Stream } from "effect"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import * as ChatData from "../src/data/ChatData.ts"
import * as Checkpoint from "../src/io/Checkpoint.ts"
import * as Dataset from "../src/data/Dataset.ts"
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
import { type Batch, type Output, Teacher, type TeacherError, toLossTeacher } from "../src/train/Teacher.ts"
import * as Tokenizer from "../src/io/Tokenizer.ts"
import * as Training from "../src/train/Training.ts"

export interface SftOptions extends Training.SupervisedOptions {
  /** The model to fine-tune; its folder must hold a tokenizer with a chat template. */
  readonly modelDir: string
  /** Chat JSONL: `{"messages": [...]}` a line. */
  readonly data: string
  /** w in `loss = (1 - w) CE + w KL`, in [0, 1]: 0 learns from the data alone, 1 from the teacher alone. */
  readonly distillWeight: number
  /** Dtype of the written model; the starting model's by default. */
  readonly dtype?: FloatDtype | undefined
  /** Each conversation of a packed row on its own, for the model and the teacher alike (`Dataset.documentMaskByDefault` when left out). */
  readonly documentMask?: boolean | undefined
  readonly onStep?: (metrics: StepMetrics) => void
}

export interface StepMetrics {
  readonly step: number
  /** `(1 - w) ce + w kl`, what the step minimised. */
  readonly loss: number
  /** Cross-entropy of the assistant tokens, nats per token. */
  readonly ce: number
  /** KL(teacher || model) on the assistant tokens; absent without a teacher. */
  readonly kl: number | undefined
  readonly lr: number
  readonly grad_norm: number
  /** Assistant tokens in the step. */
  readonly tokens: number
  readonly tokens_per_s: number
  readonly epoch: number
}

/** Options that cannot make a run. */
export class SftError extends Schema.TaggedError<SftError>()("SftError", { reason: Schema.String }) {
  override get message() {
    return `sft: ${this.reason}`
  }
}

const State = Schema.Struct({
  format: Schema.Literal("cascade-sft/1"),
  step: Schema.Int,
  /** Packed rows consumed in the seeded order. */
  rows: Schema.Int,
  /** What must be the same to resume: data, seed, model, teacher, shapes of the run. */
  identity: Schema.String,
  complete: Schema.Boolean
})
type State = typeof State.Type

/** Runs (or resumes, or finds finished) a fine-tuning; returns the final state. */
export const sft = Effect.fn("Sft.sft")(function*(options: SftOptions) {
  const { out, seq, distillWeight } = options
  if (!(distillWeight >= 0 && distillWeight <= 1)) return yield* new SftError({ reason: `the distillation weight ${distillWeight} is not in [0, 1]` })
  const teacher = distillWeight > 0 ? Option.getOrUndefined(yield* Effect.serviceOption(Teacher)) : undefined
  if (distillWeight > 0 && teacher === undefined) {
    return yield* new SftError({ reason: `a distillation weight of ${distillWeight} needs a teacher (--teacher)` })
  }
  yield* Effect.tryPromise({
    try: () => fs.mkdir(out, { recursive: true }),
    catch: (cause) => new CheckpointError({ file: out, reason: `cannot create folder (${String(cause)})` })
  })

  const model = yield* Pretrained.load(options.modelDir)
  const config = model.config
  const documentMask = options.documentMask ?? Dataset.documentMaskByDefault
  const identity = JSON.stringify({
    model: yield* Checkpoint.fingerprint(options.modelDir),
    data: yield* Files.sha256(options.data),
    teacher: teacher?.describe ?? null,
    distillWeight,
    ...Training.supervisedIdentity(options),
    dtype: options.dtype,
    documentMask
  })
  const { finished, resume } = yield* RunFolder.startingPoint(out, State, {
    identity,
    resume: options.resume,
    replace: options.replace,
    differs: "options, data, model or teacher"
  })
  if (finished !== undefined) return finished

  const side = yield* ImageSide.of(options.modelDir, yield* Tokenizer.loadIfPresent(options.modelDir))
  const rows = yield* packedRows(options.modelDir, options.data, seq, config.vocabSize, side)
  const { trainable, adam } = yield* Training.startFrom(model, resume, options.weightDecay)
  let step = resume?.state.step ?? 0
  let consumed = resume?.state.rows ?? 0
  yield* RunFolder.truncateMetrics(out, step)

  const schedule = Training.scheduleOf(options)
  const lossOptions: Loss.Options = {
    ...Loss.defaultOptions,
    // Loss.distillation minimises `KL + c CE`; scaled by w in lossOf, c = (1 - w) / w gives `w KL + (1 - w) CE`.
    crossEntropyWeight: teacher === undefined ? 0 : (1 - distillWeight) / distillWeight
  }
  const objective = lossOf(teacher === undefined ? undefined : distillWeight, lossOptions, options.headChunk)
  const state = (complete: boolean): State => ({ format: "cascade-sft/1", step, rows: consumed, identity, complete })
  const batches: Stream.Stream<Batch> = Stream.fromIterable(seededOrder(rows.length, options.seed, consumed)).pipe(
    Stream.grouped(options.batch),
    Stream.map((indices) => ({ rows: indices.map((i) => rows[i]), indices, documentMask }))
  )
  const annotated: Stream.Stream<{ readonly batch: Batch; readonly teacher: Output | undefined }, TeacherError> = teacher === undefined
    ? batches.pipe(Stream.map((batch) => ({ batch, teacher: undefined })))
    : teacher.annotate(batches)

  yield* annotated.pipe(
    Stream.grouped(options.accumulate),
    Stream.take(options.steps - step),
    Stream.runForEach((microBatches) =>
      Effect.gen(function*() {
        const started = performance.now()
        const prepared = yield* Effect.forEach(microBatches, ({ batch, teacher: output }) =>
          microBatch(batch.indices.map((i) => rows[i]), documentMask, output, config.vocabSize, lossOptions, side)
        )
        const result = yield* Training.step(trainable, adam, prepared, objective, {
          learningRate: Optimizer.learningRate(schedule, step),
          maxGradNorm: options.maxGradNorm
        })
        step++
        consumed += microBatches.reduce((n, { batch }) => n + batch.rows.length, 0)
        const metrics: StepMetrics = {
          step,
          loss: result.loss,
          ce: result.metrics.ce,
          kl: result.metrics.kl,
          lr: result.learningRate,
          grad_norm: result.gradNorm,
          tokens: result.tokens,
          tokens_per_s: result.tokens / ((performance.now() - started) / 1000),
          epoch: Math.floor((consumed - 1) / rows.length)
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
  yield* Pretrained.save(out, trainable.model, { dtype: options.dtype ?? Pretrained.storedDtype(config), companionsFrom: options.modelDir, vision: yield* Vision.loadIfPresent(options.modelDir) })
  const done = state(true)
  yield* Files.writeJson(path.join(out, "state.json"), done)
  yield* RunFolder.removeCheckpoint(out)
  return done
})

/**
 * The data set's packed rows, checked to hold something to learn and only ids the model knows; a
 * conversation's images preprocessed for the model's image side and their placeholders expanded.
 */
const packedRows = Effect.fnUntraced(function*(modelDir: string, data: string, seq: number, vocab: number, side: ImageSide.ImageSide | undefined) {
  const tokenizer = yield* Tokenizer.load(modelDir)
  const examples = yield* ChatData.examples(data, tokenizer).pipe(
    Stream.mapEffect((example) =>
      Effect.gen(function*() {
        const images = yield* ImageSide.imagesOf(data, side)({ line: example.line, ids: example.ids, imageFiles: example.imageFiles })
        if (images.length === 0) return example
        const seeing = ChatData.withImages(example, images, side!.processor, side!.tokens)!
        if (seeing.ids.length > seq) {
          return yield* new DataError({ file: data, line: example.line, reason: `is ${seeing.ids.length} tokens with its images' grids, longer than a row of ${seq} (--seq): a conversation with images is never cut` })
        }
        return seeing
      })
    ),
    Stream.runCollect
  )
  const rows = ChatData.pack(examples, seq, tokenizer.padId ?? 0)
  const outside = examples.find((example) => example.ids.some((id) => id >= vocab))
  if (outside !== undefined) {
    return yield* new DataError({ file: data, line: outside.line, reason: `has token ids outside the model's vocabulary (${vocab})` })
  }
  if (!rows.some((row) => ChatData.lossMask(row).includes(1))) {
    return yield* new DataError({ file: data, reason: `holds no assistant token to train on within ${seq} tokens` })
  }
  return rows
})

/** Row indices from the `start`-th on, epoch after epoch, each epoch a permutation seeded by (seed, epoch). */
function* seededOrder(count: number, seed: number, start: number): Generator<number> {
  const first = Math.floor(start / count)
  for (let epoch = first; ; epoch++) {
    const order = Random.permutation(count, Random.uniform(Math.imul(seed + 1, 0x9e3779b1) ^ Math.imul(epoch + 1, 0x85ebca6b)))
    for (let i = epoch === first ? start % count : 0; i < count; i++) yield order[i]
  }
}

interface MicroBatch {
  readonly ids: Array<Array<number>>
  /** How the model reads the rows: padding, the conversations' starts with document masking, the rows' images. */
  readonly masks: Loss.ForwardInputs
  /** Positions the loss counts: those whose next token is an assistant token. */
  readonly mask: Array<Array<number>>
  readonly targets: Array<Array<number>>
  readonly target: Loss.Target
}

/**
 * Rows and their teacher output as the loss consumes them; the target's tensors live with the scope.
 * Without a teacher the target is the data itself, the next token with probability 1, from which
 * the KL is exactly the cross-entropy.
 */
const microBatch = Effect.fnUntraced(function*(
  rows: ReadonlyArray<ChatData.Row>,
  documentMask: boolean,
  output: Output | undefined,
  vocab: number,
  loss: Loss.Options,
  side: ImageSide.ImageSide | undefined
) {
  const t = rows[0].ids.length
  const ids = rows.map((row) => [...row.ids])
  const imageFeatures = yield* ImageSide.rowFeatures(rows, side)
  const masks: Loss.ForwardInputs = { ...Dataset.rowMasks(rows, documentMask), imageFeatures }
  const mask = rows.map(ChatData.lossMask)
  const targets = ids.map((row) => row.map((_, i) => row[i + 1] ?? 0))
  const teacher: Loss.Teacher = output === undefined
    ? { _tag: "TopK", ids: tf.tensor3d(targets.flat(), [rows.length, t, 1], "int32"), logProbs: tf.zeros<tf.Rank.R3>([rows.length, t, 1]) }
    : toLossTeacher(output, rows.length, t)
  const target = yield* Loss.teacherTarget(teacher, vocab, mask, loss).pipe(
    Effect.ensuring(Effect.sync(() => tf.dispose(teacher._tag === "Full" ? [teacher.logProbs] : [teacher.ids, teacher.logProbs])))
  )
  return { ids, masks, mask, targets, target } satisfies MicroBatch
})

/** The objective: the data's cross-entropy alone, or `w` times `KL + ((1 - w) / w) CE` with a teacher. */
const lossOf = (distillWeight: number | undefined, options: Loss.Options, headChunk: number | undefined) => (model: Model.Model, batch: MicroBatch): Training.Objective => {
  const { loss, tokens, metrics } = Loss.ofModel(model, batch.ids, batch.masks, batch.target, batch, options, headChunk)
  return distillWeight === undefined
    ? { loss, tokens, metrics: { ce: metrics.ce } }
    : { loss: tf.mul(loss, distillWeight), tokens, metrics }
}

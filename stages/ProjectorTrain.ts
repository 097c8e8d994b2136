/**
 * The projector-only step of Ministral 3's recipe: each child gets a projector of its own, trained
 * with everything else frozen (the vision encoder, which every size shares, and the text model) so
 * that the child's next-token distributions on image prompts become its teacher's, the teacher
 * seeing the same images: forward KL over the text targets (image tokens are inputs, not targets),
 * the distillation loss at temperature 1 (Loss.distillation).
 * Lines are grouped into batches, their rows right-padded to one length (attention is causal, so
 * padding at the end leaves the real positions as they are) and the padding masked out of the KL.
 * The encoder's features and the teacher's log-probabilities are computed once per batch; each step
 * runs the projector and the child's text model over one batch and updates the projector (AdamW).
 */
import * as tf from "@tensorflow/tfjs"
import { Effect, Stream } from "effect"
import * as path from "node:path"
import * as Dataset from "../src/data/Dataset.ts"
import * as Images from "../src/data/Images.ts"
import * as ImageSide from "../src/data/ImageSide.ts"
import { CheckpointError } from "../src/Errors.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Tokenizer from "../src/io/Tokenizer.ts"
import * as Model from "../src/model/Model.ts"
import * as Vision from "../src/model/Vision.ts"
import * as Loss from "../src/train/Loss.ts"
import * as Optimizer from "../src/train/Optimizer.ts"

export interface ProjectorOptions {
  /** The child: a Mistral 3 model whose projector is trained. */
  readonly studentDir: string
  /** The teacher: a Mistral 3 model seeing the same images (the parent). */
  readonly teacherDir: string
  /** JSONL lines with images, as `cascade eval` reads them; lines without images are skipped. */
  readonly data: string
  readonly out: string
  readonly steps: number
  readonly learningRate: number
  /** Lines per step (and per forward pass when measuring the KL); `defaultBatch` when left out. */
  readonly batch?: number | undefined
  /** The first this many lines with images are trained on; all when left out. */
  readonly lines?: number | undefined
}

export const defaultBatch = 8

export interface ProjectorResult {
  readonly steps: number
  /** Mean KL(teacher || child) per text target of each line with images, averaged over the lines, before and after. */
  readonly klBefore: number
  readonly klAfter: number
}

/** One batch's fixed parts: its rows, the child's encoder features of their images and the teacher's target at their text targets. */
interface Batch {
  /** The lines' ids but the last, right-padded to one length. */
  readonly inputs: ReadonlyArray<ReadonlyArray<number>>
  /** The images of all rows, in row order, as Model.forward splices them. */
  readonly sizes: ReadonlyArray<Vision.ImageSize>
  readonly encoded: ReadonlyArray<tf.Tensor2D>
  readonly target: Loss.Target
  /** The KL's positions: those whose next token is a text token of the line (not an image token, not padding). */
  readonly positions: { readonly mask: ReadonlyArray<ReadonlyArray<number>>; readonly targets: ReadonlyArray<ReadonlyArray<number>> }
}

/** Pads rows: any id but an image token's, so that padding is never spliced; it is never a target either. */
const padId = 0

const sideOf = (dir: string) =>
  Effect.gen(function*() {
    const side = yield* ImageSide.of(dir, yield* Tokenizer.loadIfPresent(dir))
    if (side === undefined) return yield* new CheckpointError({ file: path.join(dir, "config.json"), reason: "has no image side (a Mistral 3 model with its vision encoder is needed)" })
    return side
  })

/** The child's logits on a batch, with its projector as `vision` has it. */
const logitsOf = (model: Model.Model, vision: Vision.Vision, batch: Batch) =>
  Model.forward(model, batch.inputs, { imageFeatures: { features: Vision.projectAll(vision, batch.encoded, batch.sizes), tokenId: vision.config.imageTokenId } }).logits

/** Mean KL(teacher || child) per text target of a batch (Loss.distillation at T = 1): what a step minimises. */
const klOf = (model: Model.Model, vision: Vision.Vision, batch: Batch): tf.Scalar =>
  tf.tidy(() => Loss.distillation(logitsOf(model, vision, batch), batch.target, batch.positions, Loss.defaultOptions).loss)

/**
 * Each line's mean KL per text target, summed over the batch's lines: one forward pass, the KL
 * taken once per row with the other rows masked out, so that a long line weighs as much as a short one.
 */
const lineKlSum = (model: Model.Model, vision: Vision.Vision, batch: Batch): tf.Scalar =>
  tf.tidy(() => {
    const logits = logitsOf(model, vision, batch)
    const { mask, targets } = batch.positions
    const rowOnly = (row: number) => mask.map((keep, r) => (r === row ? keep : keep.map(() => 0)))
    return tf.addN(mask.map((_, row) => Loss.distillation(logits, batch.target, { mask: rowOnly(row), targets }, Loss.defaultOptions).loss))
  })

const meanKl = (model: Model.Model, vision: Vision.Vision, batches: ReadonlyArray<Batch>) =>
  Effect.promise(async () => {
    let total = 0
    let lines = 0
    for (const batch of batches) {
      const kl = lineKlSum(model, vision, batch)
      total += (await kl.data())[0]
      kl.dispose()
      lines += batch.inputs.length
    }
    return total / lines
  })

/** The teacher's and the child's fixed parts of a batch of prepared lines; released with the scope. */
const fixedBatch = Effect.fnUntraced(function*(teacher: Model.Model, teacherSide: ImageSide.ImageSide, studentSide: ImageSide.ImageSide, student: Model.Model, lines: ReadonlyArray<ImageSide.Prepared>) {
  const length = Math.max(...lines.map((line) => line.ids.length))
  const rows = lines.map((line) => [...line.ids, ...new Array<number>(length - line.ids.length).fill(padId)])
  const inputs = rows.map((row) => row.slice(0, -1))
  const positions: Batch["positions"] = {
    mask: rows.map((row, r) => row.slice(1).map((id, i) => (i + 1 < lines[r].ids.length && !Images.isImageToken(studentSide.tokens, id) ? 1 : 0))),
    targets: rows.map((row) => row.slice(1))
  }
  const images = lines.flatMap((line) => line.images)
  const logProbs = yield* Effect.acquireRelease(
    Effect.sync(() => tf.tidy(() => {
      const seen = Vision.featuresOfImages(teacherSide.vision, images).projected
      return tf.logSoftmax(Model.forward(teacher, inputs, { imageFeatures: { features: seen, tokenId: teacherSide.tokens.image } }).logits) as tf.Tensor3D
    })),
    (tensor) => Effect.sync(() => tensor.dispose())
  )
  const target = yield* Loss.teacherTarget({ _tag: "Full", logProbs }, student.config.vocabSize, positions.mask, Loss.defaultOptions)
  const encoded = yield* Effect.acquireRelease(
    Effect.sync(() => tf.tidy(() => [...Vision.featuresOfImages(studentSide.vision, images).encoded])),
    (tensors) => Effect.sync(() => tf.dispose(tensors))
  )
  return { inputs, sizes: images.map((image) => [image.height, image.width] as const), encoded, target, positions } satisfies Batch
})

/** Trains the child's projector against the teacher and saves the child whole in `out`. */
export const trainProjector = Effect.fn("ProjectorTrain.train")(function*(options: ProjectorOptions) {
  const student = yield* Pretrained.load(options.studentDir)
  const teacher = yield* Pretrained.load(options.teacherDir)
  const [studentSide, teacherSide] = [yield* sideOf(options.studentDir), yield* sideOf(options.teacherDir)]
  const grouped = yield* Dataset.sequences(options.data, { vocabSize: student.config.vocabSize, tokenizer: yield* Tokenizer.loadIfPresent(options.studentDir) }).pipe(
    Stream.filter((sequence) => (sequence.imageFiles?.length ?? 0) > 0),
    Stream.take(options.lines ?? Infinity),
    Stream.mapEffect(ImageSide.prepare(options.data, studentSide)),
    Stream.grouped(options.batch ?? defaultBatch),
    Stream.runCollect
  )
  if (grouped.length === 0) return yield* new CheckpointError({ file: options.data, reason: "has no line with images to train a projector on" })
  const batches = yield* Effect.forEach(grouped, (lines) => fixedBatch(teacher, teacherSide, studentSide, student, lines))
  // The loaded weights themselves, as Training does: an update gives a variable new data and leaves the weight's; a clone would outlive the scope.
  const variables = new Map([...Vision.projectorWeights(studentSide.vision)].map(([name, tensor]) => [name, tf.variable(tensor)] as const))
  yield* Effect.addFinalizer(() => Effect.sync(() => tf.dispose([...variables.values()])))
  const vision = Vision.withProjector(studentSide.vision, variables)
  const adam = yield* Optimizer.make(variables, { ...Optimizer.defaultConfig, weightDecay: 0 })
  const klBefore = yield* meanKl(student, vision, batches)
  const nameOf = new Map([...variables].map(([name, variable]) => [variable.name, name]))
  for (let step = 0; step < options.steps; step++) {
    const { value, grads } = tf.variableGrads(() => klOf(student, vision, batches[step % batches.length]), [...variables.values()])
    Optimizer.update(adam, new Map(Object.entries(grads).map(([id, grad]) => [nameOf.get(id)!, grad])), options.learningRate)
    tf.dispose([value, ...Object.values(grads)])
  }
  const klAfter = yield* meanKl(student, vision, batches)
  yield* Pretrained.save(options.out, student, { dtype: Pretrained.storedDtype(student.config), companionsFrom: options.studentDir, vision })
  return { steps: options.steps, klBefore, klAfter } satisfies ProjectorResult
})

/**
 * The projector-only step of Ministral 3's recipe: each child gets a projector of its own, trained
 * with everything else frozen (the vision encoder, which every size shares, and the text model) so
 * that the child's next-token distributions on image prompts become its teacher's, the teacher
 * seeing the same images: forward KL over the text targets (image tokens are inputs, not targets),
 * the distillation loss at temperature 1 (Loss.distillation).
 * The encoder's features and the teacher's log-probabilities are computed once; each step runs the
 * projector and the child's text model over one line of the data and updates the projector (AdamW).
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
  /** The first this many lines with images are trained on; all when left out. */
  readonly lines?: number | undefined
}

export interface ProjectorResult {
  readonly steps: number
  /** Mean KL(teacher || child) per text target over the lines with images, before and after. */
  readonly klBefore: number
  readonly klAfter: number
}

/** One line's fixed parts: its ids, the child's encoder features of its images and the teacher's target at its text targets. */
interface Line {
  readonly ids: ReadonlyArray<number>
  readonly sizes: ReadonlyArray<Vision.ImageSize>
  readonly encoded: ReadonlyArray<tf.Tensor2D>
  readonly target: Loss.Target
  /** The KL's positions: those whose next token is a text token. */
  readonly batch: Loss.DistillationBatch
}

const sideOf = (dir: string) =>
  Effect.gen(function*() {
    const side = yield* ImageSide.of(dir, yield* Tokenizer.loadIfPresent(dir))
    if (side === undefined) return yield* new CheckpointError({ file: path.join(dir, "config.json"), reason: "has no image side (a Mistral 3 model with its vision encoder is needed)" })
    return side
  })

/** Mean KL(teacher || child) per text target of a line, with the child's projector as `vision` has it (Loss.distillation at T = 1). */
const klOf = (model: Model.Model, vision: Vision.Vision, line: Line): tf.Scalar =>
  tf.tidy(() => {
    const features = Vision.projectAll(vision, line.encoded, line.sizes)
    const { logits } = Model.forward(model, [line.ids.slice(0, -1)], { imageFeatures: { features, tokenId: vision.config.imageTokenId } })
    return Loss.distillation(logits, line.target, line.batch, Loss.defaultOptions).loss
  })

const meanKl = (model: Model.Model, vision: Vision.Vision, lines: ReadonlyArray<Line>) =>
  Effect.promise(async () => {
    let total = 0
    for (const line of lines) {
      const kl = klOf(model, vision, line)
      total += (await kl.data())[0]
      kl.dispose()
    }
    return total / lines.length
  })

/** The teacher's and the child's fixed parts of one prepared line; released with the scope. */
const fixedLine = Effect.fnUntraced(function*(teacher: Model.Model, teacherSide: ImageSide.ImageSide, studentSide: ImageSide.ImageSide, student: Model.Model, prepared: ImageSide.Prepared) {
  const batch: Loss.DistillationBatch = {
    mask: [prepared.ids.slice(1).map((id) => (Images.isImageToken(studentSide.tokens, id) ? 0 : 1))],
    targets: [prepared.ids.slice(1)]
  }
  const logProbs = yield* Effect.acquireRelease(
    Effect.sync(() => tf.tidy(() => {
      const seen = Vision.featuresOfImages(teacherSide.vision, prepared.images).projected
      return tf.logSoftmax(Model.forward(teacher, [prepared.ids.slice(0, -1)], { imageFeatures: { features: seen, tokenId: teacherSide.tokens.image } }).logits) as tf.Tensor3D
    })),
    (tensor) => Effect.sync(() => tensor.dispose())
  )
  const target = yield* Loss.teacherTarget({ _tag: "Full", logProbs }, student.config.vocabSize, batch.mask, Loss.defaultOptions)
  const encoded = yield* Effect.acquireRelease(
    Effect.sync(() => tf.tidy(() => [...Vision.featuresOfImages(studentSide.vision, prepared.images).encoded])),
    (tensors) => Effect.sync(() => tf.dispose(tensors))
  )
  return { ids: prepared.ids, sizes: prepared.images.map((image) => [image.height, image.width] as const), encoded, target, batch } satisfies Line
})

/** Trains the child's projector against the teacher and saves the child whole in `out`. */
export const trainProjector = Effect.fn("ProjectorTrain.train")(function*(options: ProjectorOptions) {
  const student = yield* Pretrained.load(options.studentDir)
  const teacher = yield* Pretrained.load(options.teacherDir)
  const [studentSide, teacherSide] = [yield* sideOf(options.studentDir), yield* sideOf(options.teacherDir)]
  const prepared = yield* Dataset.sequences(options.data, { vocabSize: student.config.vocabSize, tokenizer: yield* Tokenizer.loadIfPresent(options.studentDir) }).pipe(
    Stream.filter((sequence) => (sequence.imageFiles?.length ?? 0) > 0),
    Stream.take(options.lines ?? Infinity),
    Stream.mapEffect(ImageSide.prepare(options.data, studentSide)),
    Stream.runCollect
  )
  if (prepared.length === 0) return yield* new CheckpointError({ file: options.data, reason: "has no line with images to train a projector on" })
  const lines = yield* Effect.forEach(prepared, (line) => fixedLine(teacher, teacherSide, studentSide, student, line))
  const variables = new Map([...Vision.projectorWeights(studentSide.vision)].map(([name, tensor]) => [name, tf.variable(tensor.clone())] as const))
  yield* Effect.addFinalizer(() => Effect.sync(() => tf.dispose([...variables.values()])))
  const vision = Vision.withProjector(studentSide.vision, variables)
  const adam = yield* Optimizer.make(variables, { ...Optimizer.defaultConfig, weightDecay: 0 })
  const klBefore = yield* meanKl(student, vision, lines)
  const nameOf = new Map([...variables].map(([name, variable]) => [variable.name, name]))
  for (let step = 0; step < options.steps; step++) {
    const { value, grads } = tf.variableGrads(() => klOf(student, vision, lines[step % lines.length]), [...variables.values()])
    Optimizer.update(adam, new Map(Object.entries(grads).map(([id, grad]) => [nameOf.get(id)!, grad])), options.learningRate)
    tf.dispose([value, ...Object.values(grads)])
  }
  const klAfter = yield* meanKl(student, vision, lines)
  yield* Pretrained.save(options.out, student, { dtype: Pretrained.storedDtype(student.config), companionsFrom: options.studentDir, vision })
  return { steps: options.steps, klBefore, klAfter } satisfies ProjectorResult
})

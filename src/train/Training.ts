/**
 * Training a model: its weights as variables, one optimizer step over micro-batches (gradient
 * accumulation, global-norm clipping, AdamW), and a seeded random initialisation.
 *
 * Gradient accumulation weights each micro-batch by its tokens: a micro-batch's loss is a mean over
 * its own tokens, so `sum_i tokens_i grad_i / sum_i tokens_i` is the gradient of the mean over all
 * the step's tokens, whatever the padding of each micro-batch.
 */
import * as tf from "@tensorflow/tfjs"
import { Effect } from "effect"
import type { ModelConfig } from "../model/Config.ts"
import * as Model from "../model/Model.ts"
import * as Optimizer from "./Optimizer.ts"
import * as TensorCoreMatMul from "../gpu/TensorCoreMatMul.ts"
import * as Pretrained from "../io/Pretrained.ts"
import * as Random from "../Random.ts"
import type * as RunFolder from "./RunFolder.ts"

export interface Trainable {
  /** The model over the variables: forward it like any model. */
  readonly model: Model.Model
  /** The variables by checkpoint name. */
  readonly variables: ReadonlyMap<string, tf.Variable>
}

/**
 * `model`'s weights as variables, released with the scope. They share memory with the model's
 * tensors until the first update replaces them; `model` itself is left as it was.
 */
export const trainable = Effect.fn("Training.trainable")(function*(model: Model.Model) {
  return yield* Effect.acquireRelease(
    Effect.sync((): Trainable => {
      const variables = new Map(
        [...Model.tensorsOfWeights(model.config, model.weights)].map(([name, tensor]) => [name, tf.variable(tensor)])
      )
      return { model: { ...model, weights: Model.weightsFromTensors(model.config, variables) }, variables }
    }),
    (trainable) => Effect.sync(() => tf.dispose([...trainable.variables.values()]))
  )
})

/**
 * The L2 norm of all the gradients together, a scalar on the backend (read with the step's other
 * scalars). Summed pairwise: WebGPU's AddN binds every input at once, past the 16 storage buffers a
 * shader may have.
 */
const globalNorm = (grads: ReadonlyMap<string, tf.Tensor>): tf.Scalar =>
  tf.tidy(() => tf.sqrt([...grads.values()].map((grad) => tf.sum(tf.square(grad))).reduce((sum, square) => tf.add(sum, square))) as tf.Scalar)

/**
 * Scales `grads` so that their global L2 norm is at most `maxNorm`, as torch's clip_grad_norm_:
 * by `min(1, maxNorm / (norm + 1e-6))`, computed on the backend so that the step need not wait for
 * the norm (a factor of exactly 1 leaves every gradient bit-identical). Returns the norm before
 * clipping, a scalar the caller disposes; the input tensors are disposed when replaced.
 */
export const clipByGlobalNorm = (grads: Map<string, tf.Tensor>, maxNorm: number): tf.Scalar => {
  const norm = globalNorm(grads)
  const scale = tf.tidy(() => tf.minimum(tf.div(maxNorm, tf.add(norm, 1e-6)), 1))
  for (const [name, grad] of grads) {
    grads.set(name, tf.mul(grad, scale))
    grad.dispose()
  }
  scale.dispose()
  return norm
}

/**
 * What a loss function gives the training step: the scalar to minimise (a mean over `tokens`) and
 * scalar metrics, also means over `tokens`. All are tensors the caller owns: the step reads them
 * together with its other scalars, so that a GPU is waited for once a step.
 */
export interface Objective {
  readonly loss: tf.Scalar
  readonly tokens: number
  readonly metrics: Readonly<Record<string, tf.Scalar>>
}

/**
 * The trainable model and optimiser a run goes on with: its checkpoint's weights and moments when
 * it resumes, else `model` and fresh moments. Released with the scope.
 */
export const startFrom = Effect.fn("Training.startFrom")(function*(
  model: Model.Model,
  resume: { readonly dir: string; readonly moments: Optimizer.State } | undefined,
  weightDecay: number
) {
  const start = resume === undefined ? model : Model.make(model.config, (yield* Pretrained.load(resume.dir)).weights)
  const run = yield* trainable(start)
  const adam = yield* Optimizer.make(run.variables, { ...Optimizer.defaultConfig, weightDecay }, resume?.moments)
  return { trainable: run, adam }
})

/** A supervised run's learning rate: warmup, then cosine down to its minimum at the last step. */
export const scheduleOf = (options: SupervisedOptions): Optimizer.Schedule => ({
  peak: options.learningRate,
  min: options.minLearningRate,
  warmupSteps: options.warmupSteps,
  totalSteps: options.steps
})

/**
 * What of a supervised run's options makes its result: lengths, data order and optimisation, for a
 * stage's run identity (where it writes, how often it saves and whether it resumes do not count).
 */
export const supervisedIdentity = (options: SupervisedOptions) => ({
  seq: options.seq,
  seed: options.seed,
  batch: options.batch,
  accumulate: options.accumulate,
  steps: options.steps,
  learningRate: options.learningRate,
  minLearningRate: options.minLearningRate,
  warmupSteps: options.warmupSteps,
  weightDecay: options.weightDecay,
  maxGradNorm: options.maxGradNorm
})

/** What every supervised training run (distillation, SFT) is given: lengths, data order, optimisation, checkpoints. */
export interface SupervisedOptions extends RunFolder.Options {
  readonly out: string
  /** Row length of the packing. */
  readonly seq: number
  readonly steps: number
  /** Seeds the data order. */
  readonly seed: number
  /** Rows per micro-batch. */
  readonly batch: number
  /** Micro-batches per optimizer step. */
  readonly accumulate: number
  readonly learningRate: number
  readonly minLearningRate: number
  readonly warmupSteps: number
  readonly weightDecay: number
  readonly maxGradNorm: number | undefined
  /**
   * Apply the LM head and the loss this many tokens at a time (Loss.chunkedDistillation), never
   * holding a micro-batch's [tokens, V] logits; all at once when left out. Equal up to rounding.
   */
  readonly headChunk?: number | undefined
}

export interface StepOptions {
  readonly learningRate: number
  /** Clip the global gradient norm to this; no clipping when undefined. */
  readonly maxGradNorm: number | undefined
}

/** Token-weighted means over the step's micro-batches, the learning rate and the gradient norm before clipping. */
export interface StepResult {
  readonly loss: number
  readonly metrics: Readonly<Record<string, number>>
  readonly tokens: number
  readonly gradNorm: number
  readonly learningRate: number
  /** The update was skipped: loss-scaled gradients overflowed (mixed precision). */
  readonly skipped: boolean
}

/** After a loss-scaled step: an overflow halves the scale and takes back the step count; clean steps in a row double it. */
const adjustScale = (scaler: Optimizer.LossScaler, optimizer: Optimizer.AdamW, skipped: boolean) => {
  if (skipped) {
    scaler.scale /= 2
    scaler.goodSteps = 0
    scaler.skipped++
    optimizer.step-- // the GPU left parameters and moments as they were
    return
  }
  if (++scaler.goodSteps >= Optimizer.growthInterval) {
    scaler.scale *= 2
    scaler.goodSteps = 0
  }
}

/**
 * One optimizer step: the gradients of `lossOf` summed over the micro-batches, token-weighted,
 * clipped, then applied by `optimizer`. Leaves no tensors behind.
 */
export const step = Effect.fn("Training.step")(function*<Batch>(
  trainable: Trainable,
  optimizer: Optimizer.AdamW,
  microBatches: ReadonlyArray<Batch>,
  lossOf: (model: Model.Model, batch: Batch) => Objective,
  options: StepOptions
) {
  const nameOf = new Map([...trainable.variables].map(([name, variable]) => [variable.name, name]))
  const variables = [...trainable.variables.values()]
  const sums = new Map<string, tf.Tensor>()
  // Token-weighted sums of the loss and metrics stay on the backend until the step's one read.
  const scalarSums = new Map<string, tf.Scalar>()
  let tokens = 0
  const addWeighted = (name: string, value: tf.Scalar, weight: number) => {
    const previous = scalarSums.get(name)
    scalarSums.set(name, tf.tidy(() => (previous === undefined ? tf.mul(value, weight) : tf.add(previous, tf.mul(value, weight)))))
    previous?.dispose()
    value.dispose()
  }
  // Mixed precision scales the loss (Optimizer.LossScaler); fp32 takes the gradients as they are.
  const scaler = TensorCoreMatMul.current() === "mixed" ? optimizer.scaler : undefined
  for (const batch of microBatches) {
    let result: Objective | undefined
    const { value, grads } = tf.variableGrads(() => {
      result = lossOf(trainable.model, batch)
      for (const metric of Object.values(result.metrics)) tf.keep(metric)
      return scaler === undefined ? result.loss : tf.mul(tf.keep(result.loss), scaler.scale)
    }, variables)
    const { metrics, tokens: batchTokens } = result!
    tokens += batchTokens
    if (scaler !== undefined) value.dispose()
    addWeighted("loss", scaler === undefined ? value : result!.loss, batchTokens)
    for (const [name, metric] of Object.entries(metrics)) addWeighted(`metric.${name}`, metric, batchTokens)
    for (const [id, grad] of Object.entries(grads)) {
      const name = nameOf.get(id)!
      const previous = sums.get(name)
      sums.set(name, tf.tidy(() => {
        const weighted = tf.mul(grad, batchTokens)
        return previous === undefined ? weighted : tf.add(previous, weighted)
      }))
      grad.dispose()
      previous?.dispose()
    }
  }
  const divisor = Math.max(tokens, 1)
  for (const [name, sum] of sums) {
    sums.set(name, tf.tidy(() => tf.div(sum, divisor * (scaler?.scale ?? 1))))
    sum.dispose()
  }
  const norm = options.maxGradNorm === undefined ? globalNorm(sums) : clipByGlobalNorm(sums, options.maxGradNorm)
  // An overflowed step is skipped on the GPU itself: the host learns of it at the step's one read.
  const apply = scaler === undefined ? undefined : tf.tidy(() => tf.cast(tf.isFinite(norm), "float32") as tf.Scalar)
  Optimizer.update(optimizer, sums, options.learningRate, apply)
  tf.dispose([...sums.values()])
  apply?.dispose()
  const names = [...scalarSums.keys()]
  const read = tf.stack([...scalarSums.values(), norm])
  tf.dispose([...scalarSums.values(), norm])
  const values = yield* Effect.promise(() => read.data()).pipe(Effect.ensuring(Effect.sync(() => read.dispose())))
  const mean = (name: string) => values[names.indexOf(name)] / divisor
  const gradNorm = values[names.length]
  const skipped = scaler !== undefined && !Number.isFinite(gradNorm)
  if (scaler !== undefined) adjustScale(scaler, optimizer, skipped)
  return {
    loss: mean("loss"),
    metrics: Object.fromEntries(names.filter((name) => name.startsWith("metric.")).map((name) => [name.slice("metric.".length), mean(name)])),
    tokens,
    gradNorm,
    learningRate: options.learningRate,
    skipped
  } satisfies StepResult
})

/**
 * A model of `config` initialised as transformers does, from `seed`: matrices normal with std
 * `initializer_range` (0.02 unless the config says), norm weights 1. Released with the scope.
 */
export const initialise = Effect.fn("Training.initialise")(function*(config: ModelConfig, seed: number) {
  const std = typeof config.raw.initializer_range === "number" ? config.raw.initializer_range : 0.02
  return yield* Effect.acquireRelease(
    Effect.sync(() => {
      const next = Random.uniform(seed)
      const tensors = new Map(Model.tensorShapes(config).flatMap(({ name, shape }) => {
        const count = shape.reduce((a, b) => a * b, 1)
        const values = shape.length === 1 ? new Float32Array(count).fill(1) : Random.normals(next, count, std)
        return Model.heldTensors(name, shape, values)
      }))
      return Model.make(config, Model.weightsFromTensors(config, tensors))
    }),
    (model) => Effect.sync(() => Model.dispose(model))
  )
})

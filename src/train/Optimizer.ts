/**
 * AdamW as PyTorch's `torch.optim.AdamW` computes it, and the learning-rate schedule.
 *
 * Per parameter p with gradient g, at step t (counted from 1):
 *   p <- p (1 - lr wd)                                   decoupled decay, from the old p
 *   m <- m + (1 - b1)(g - m)                             torch's lerp
 *   v <- b2 v + (1 - b2) g^2
 *   p <- p - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)    eps outside the sqrt
 *
 * Weight decay skips 1-D parameters (RMSNorm weights) unless `decayVectors`: decay pulls weights
 * toward 0, the right prior for a matrix but not for a norm's gain, whose neutral value is 1
 * (nanoGPT and most LLM recipes do the same). Embeddings and the LM head are matrices and decay.
 *
 * The state (m, v, step) exports to Float32Arrays by parameter name and imports back bit for bit.
 */
import * as tf from "@tensorflow/tfjs"
import { Effect, Schema } from "effect"
import * as FusedAdamW from "../gpu/FusedAdamW.ts"

export interface Config {
  readonly beta1: number
  readonly beta2: number
  readonly eps: number
  readonly weightDecay: number
  /** Decay 1-D parameters too. */
  readonly decayVectors: boolean
}

/** PyTorch's defaults. */
export const defaultConfig: Config = { beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.01, decayVectors: false }

/** Linear warmup to `peak` over `warmupSteps`, then cosine decay to `min` at `totalSteps`, `min` after. */
export interface Schedule {
  readonly peak: number
  readonly min: number
  readonly warmupSteps: number
  readonly totalSteps: number
}

/**
 * The learning rate of the update that follows `step` updates (0 for the first). Warmup climbs
 * `peak / warmupSteps` a step, so the first update already moves and update `warmupSteps` is at peak.
 */
export const learningRate = (schedule: Schedule, step: number): number => {
  const { peak, min, warmupSteps, totalSteps } = schedule
  if (step < warmupSteps) return (peak * (step + 1)) / warmupSteps
  if (step >= totalSteps) return min
  const progress = (step - warmupSteps) / Math.max(1, totalSteps - warmupSteps)
  return min + 0.5 * (peak - min) * (1 + Math.cos(Math.PI * progress))
}

/**
 * Dynamic loss scaling for mixed precision, as torch's GradScaler: the loss is multiplied by `scale`
 * before the gradients so that small ones survive f16 operands, and the gradients divided by it
 * after. A step whose gradients overflow (a non-finite norm) changes nothing and halves the scale;
 * `growthInterval` clean steps in a row double it.
 */
export interface LossScaler {
  scale: number
  /** Clean steps since the scale last changed. */
  goodSteps: number
  /** Steps skipped for overflow, over the run. */
  skipped: number
}

export const initialLossScale = 2 ** 16
export const growthInterval = 2000

/** Moments and step count as plain arrays, each moment the parameter's values flattened row-major; the loss scaler where one ran. */
export interface State {
  readonly step: number
  readonly expAvg: ReadonlyMap<string, Float32Array>
  readonly expAvgSq: ReadonlyMap<string, Float32Array>
  readonly scaler?: LossScaler | undefined
}

export interface AdamW {
  readonly config: Config
  readonly params: ReadonlyMap<string, tf.Variable>
  readonly expAvg: ReadonlyMap<string, tf.Variable>
  readonly expAvgSq: ReadonlyMap<string, tf.Variable>
  /** Updates applied so far. */
  step: number
  readonly scaler: LossScaler
}

/** A saved state that does not fit the parameters: a name missing or extra, or a wrong size. */
export class OptimizerStateError extends Schema.TaggedError<OptimizerStateError>()("OptimizerStateError", {
  reason: Schema.String
}) {
  override get message() {
    return `optimizer state: ${this.reason}`
  }
}

/** Checks that `state` has a moment of the right size for every parameter and nothing else. */
const checkState = (params: ReadonlyMap<string, tf.Variable>, state: State) =>
  Effect.gen(function*() {
    for (const [which, moments] of [["exp_avg", state.expAvg], ["exp_avg_sq", state.expAvgSq]] as const) {
      for (const [name, param] of params) {
        const values = moments.get(name)
        if (values === undefined) return yield* new OptimizerStateError({ reason: `${which} of ${name} is missing` })
        if (values.length !== param.size) {
          const reason = `${which} of ${name} has ${values.length} values, the parameter ${param.size}`
          return yield* new OptimizerStateError({ reason })
        }
      }
      const extra = [...moments.keys()].find((name) => !params.has(name))
      if (extra !== undefined) return yield* new OptimizerStateError({ reason: `${which} of ${extra} names no parameter` })
    }
  })

/** An AdamW over `params`, fresh or from a saved state; its moments are released with the scope. */
export const make = Effect.fn("Optimizer.make")(function*(
  params: ReadonlyMap<string, tf.Variable>,
  config: Config,
  state?: State
) {
  if (state !== undefined) yield* checkState(params, state)
  const moment = (saved: ReadonlyMap<string, Float32Array> | undefined) =>
    new Map([...params].map(([name, param]) => {
      const initial = saved === undefined ? tf.zeros(param.shape) : tf.tensor(saved.get(name)!, param.shape, "float32")
      const variable = tf.variable(initial, false)
      initial.dispose()
      return [name, variable] as const
    }))
  return yield* Effect.acquireRelease(
    Effect.sync((): AdamW => ({
      config,
      params,
      expAvg: moment(state?.expAvg),
      expAvgSq: moment(state?.expAvgSq),
      step: state?.step ?? 0,
      scaler: { ...(state?.scaler ?? { scale: initialLossScale, goodSteps: 0, skipped: 0 }) }
    })),
    (adam) => Effect.sync(() => tf.dispose([...adam.expAvg.values(), ...adam.expAvgSq.values()]))
  )
})

/**
 * One update with `grads` (by parameter name) at learning rate `lr`; on a GPU one fused dispatch a
 * parameter. `apply`, a scalar on the backend (1 or 0), lets the GPU skip the update without the
 * host waiting to know whether to (a loss-scaled step that overflowed); fused updates only.
 */
export const update = (adam: AdamW, grads: ReadonlyMap<string, tf.Tensor>, lr: number, apply?: tf.Scalar): void => {
  const { beta1, beta2, eps, weightDecay, decayVectors } = adam.config
  adam.step += 1
  const stepSize = lr / (1 - beta1 ** adam.step)
  const correction2 = Math.sqrt(1 - beta2 ** adam.step)
  const fused = FusedAdamW.available()
  if (apply !== undefined && !fused) throw new Error("Optimizer.update: a conditional update needs the fused GPU update")
  const scalars = fused
    ? tf.tidy(() => tf.concat([tf.tensor1d([stepSize, correction2, 1 - lr * weightDecay, 1]), apply === undefined ? tf.ones([1]) : apply.reshape([1])])) as tf.Tensor1D
    : undefined
  for (const [name, param] of adam.params) {
    const grad = grads.get(name)!
    const m = adam.expAvg.get(name)!
    const v = adam.expAvgSq.get(name)!
    const decay = param.rank > 1 || decayVectors ? weightDecay : 0
    if (scalars !== undefined) {
      FusedAdamW.update(param, grad, m, v, scalars, decay !== 0, adam.config)
      continue
    }
    tf.tidy(() => {
      m.assign(tf.add(m, tf.mul(tf.sub(grad, m), 1 - beta1)))
      v.assign(tf.add(tf.mul(v, beta2), tf.mul(tf.square(grad), 1 - beta2)))
      const denominator = tf.add(tf.div(tf.sqrt(v), correction2), eps)
      const decayed = decay === 0 ? param : tf.mul(param, 1 - lr * decay)
      param.assign(tf.sub(decayed, tf.mul(tf.div(m, denominator), stepSize)))
    })
  }
  scalars?.dispose()
}

/** The state as plain arrays, read asynchronously (as a GPU backend requires). */
export const exportState = (adam: AdamW): Effect.Effect<State> =>
  Effect.promise(async () => {
    const read = async (moments: ReadonlyMap<string, tf.Variable>) =>
      new Map(await Promise.all([...moments].map(async ([name, moment]) => [name, Float32Array.from(await moment.data() as Float32Array)] as const)))
    return { step: adam.step, expAvg: await read(adam.expAvg), expAvgSq: await read(adam.expAvgSq) }
  })

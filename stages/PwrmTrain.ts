/**
 * Training a pairwise reward model (src/rewards/Pwrm.ts) on JSONL lines `{"prompt", "a", "b", "preferred": "a" | "b"}`.
 *
 * Each step takes `batch` pairs in a seeded order, epoch after epoch, and trains on both orders of
 * each, (A, B) labelled "A wins" and (B, A) labelled the opposite, with binary cross-entropy on the
 * score: the swapped copies teach the model that the order carries no information, and the
 * symmetrised probability makes that exact at inference. Backbone and head train together (AdamW,
 * warmup then cosine to a tenth of the peak, clipping). At the end the temperature is fitted on the
 * held-out pairs, and pwrm.json reports the held-out accuracy, NLL and calibration error before and
 * after it.
 *
 * OUT holds `metrics.jsonl` (a line per step), `checkpoint/` every `saveEvery` steps (weights, head,
 * optimizer moments and the step, swapped in atomically) and, at the end, the PWRM folder. A killed
 * run given the same options and `resume` continues from its last checkpoint and ends where an
 * uninterrupted run ends: the data order depends on the step alone.
 */
import * as tf from "@tensorflow/tfjs"
import { Effect, Schema, Stream } from "effect"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import * as Checkpoint from "../src/io/Checkpoint.ts"
import * as Config from "../src/model/Config.ts"
import { lines } from "../src/data/Dataset.ts"
import { CheckpointError, DataError } from "../src/Errors.ts"
import * as Files from "../src/io/Files.ts"
import type * as Model from "../src/model/Model.ts"
import * as Optimizer from "../src/train/Optimizer.ts"
import { PreferenceError } from "../src/rewards/Preference.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Pwrm from "../src/rewards/Pwrm.ts"
import * as Random from "../src/Random.ts"
import * as RunFolder from "../src/train/RunFolder.ts"
import * as Tokenizer from "../src/io/Tokenizer.ts"
import * as Training from "../src/train/Training.ts"

export interface TrainOptions extends RunFolder.Options {
  /** Backbone checkpoint folder, with its tokenizer. */
  readonly baseDir: string
  readonly data: string
  /** Held-out pairs: the temperature is fitted and the metrics reported on them. */
  readonly heldout: string
  readonly out: string
  readonly steps: number
  /** Pairs per step, each trained on in both orders. */
  readonly batch: number
  /** Most tokens of a rendered pair. */
  readonly seq: number
  readonly seed: number
  readonly learningRate: number
  readonly warmupSteps: number
  readonly weightDecay: number
  readonly maxGradNorm: number | undefined
  readonly onStep?: (metrics: StepMetrics) => void
}

export interface StepMetrics {
  readonly step: number
  /** Binary cross-entropy per row (a pair in one order), nats. */
  readonly loss: number
  /** Share of rows whose score has the label's sign. */
  readonly accuracy: number
  readonly lr: number
  readonly grad_norm: number
  readonly pairs_per_s: number
  readonly epoch: number
}

export interface Labelled extends Pwrm.Pair {
  readonly preferred: "a" | "b"
}

/** pwrm.json as this stage writes it: what `Pwrm.load` reads, metrics and provenance. */
export interface Card extends Schema.Schema.Type<typeof Pwrm.Card> {
  readonly base: { readonly dir: string; readonly configSha256: string }
  readonly data: Record<"train" | "heldout", { readonly file: string; readonly sha256: string; readonly pairs: number }>
  readonly heldoutMetrics: {
    readonly accuracy: number
    readonly before: { readonly temperature: 1; readonly nll: number; readonly ece: number }
    readonly after: { readonly temperature: number; readonly nll: number; readonly ece: number }
    /** Each half of the held-out pairs at the temperature fitted on the other half: the fit on pairs it did not see. */
    readonly crossFitted: { readonly nll: number; readonly ece: number }
  }
  /** What must be the same to resume or to find the run finished: base, data and options. */
  readonly identity: string
}

/** A checkpoint's state.json: the steps done, and what must be the same to resume them. */
const State = Schema.Struct({ step: Schema.Int, identity: Schema.String })

const Line = Schema.Struct({ prompt: Schema.String, a: Schema.String, b: Schema.String, preferred: Schema.Literals(["a", "b"]) })
const decodeLine = Schema.decodeUnknownEffect(Line)

/** The pairs of a preference file; a line that is not one fails naming the file and line. */
export const readPairs = Effect.fn("PwrmTrain.readPairs")(function*(file: string) {
  const pairs: Array<Labelled> = yield* lines(file).pipe(
    Stream.mapEffect(({ line, text }) =>
      Effect.try({
        try: () => JSON.parse(text) as unknown,
        catch: () => new DataError({ file, line, reason: "is not valid JSON" })
      }).pipe(
        Effect.flatMap(decodeLine),
        Effect.mapError((error) =>
          error._tag === "DataError" ? error : new DataError({ file, line, reason: `expected {"prompt", "a", "b": string, "preferred": "a" | "b"}` })
        )
      )
    ),
    Stream.runCollect
  )
  if (pairs.length === 0) return yield* new DataError({ file, reason: "holds no pair" })
  return pairs
})

/**
 * The pair at each position of a seeded order, epoch after epoch: epoch e is a permutation seeded by
 * (seed, e), so the order at any position follows from the position alone.
 */
const seededOrder = <A>(items: ReadonlyArray<A>, seed: number) => {
  let current = { epoch: -1, order: [] as Array<number> }
  return (position: number): A => {
    const epoch = Math.floor(position / items.length)
    if (epoch !== current.epoch) {
      const next = Random.uniform(Math.imul(seed + 1, 0x9e3779b1) ^ Math.imul(epoch + 1, 0x85ebca6b))
      current = { epoch, order: Random.permutation(items.length, next) }
    }
    return items[current.order[position % items.length]]
  }
}

interface Rows {
  readonly ids: Array<Array<number>>
  /** 1 where the row's first response won. */
  readonly labels: Array<number>
}

/** Each pair in both orders. */
const bothOrders = (tokenizer: Tokenizer.Tokenizer, seq: number, pairs: ReadonlyArray<Labelled>): Rows => ({
  ids: pairs.flatMap(({ prompt, a, b }) => [Pwrm.encode(tokenizer, seq, { prompt, a, b }), Pwrm.encode(tokenizer, seq, { prompt, a: b, b: a })]),
  labels: pairs.flatMap(({ preferred }) => (preferred === "a" ? [1, 0] : [0, 1]))
})

/** Binary cross-entropy of the rows' scores, softplus(z) - y z, with the share of rows on the label's side. */
const lossOf = (padId: number) => (model: Model.Model, rows: Rows): Training.Objective =>
  tf.tidy(() => {
    const z = Pwrm.logits(model, rows.ids, padId)
    const y = tf.tensor1d(rows.labels)
    // On the label's side: sign(z) agrees with 2y - 1; a score of exactly 0 counts half.
    const accuracy = tf.mean(tf.div(tf.add(1, tf.mul(tf.sign(z), tf.sub(tf.mul(y, 2), 1))), 2)) as tf.Scalar
    return { loss: tf.mean(tf.sub(tf.softplus(z), tf.mul(z, y))) as tf.Scalar, tokens: rows.labels.length, metrics: { accuracy } }
  })

/** Held-out metrics at temperature 1 and at the fitted one, and the fit checked across halves. */
const heldoutMetrics = (judged: ReadonlyArray<Pwrm.Judged>) => {
  const temperature = Pwrm.fitTemperature(judged)
  const before = Pwrm.calibration(judged, 1)
  const after = Pwrm.calibration(judged, temperature)
  // Scores divided by tau give at temperature 1 the probabilities of the scores at temperature tau.
  const atTemperature = (pairs: ReadonlyArray<Pwrm.Judged>, tau: number) => pairs.map((p) => ({ ...p, ab: p.ab / tau, ba: p.ba / tau }))
  const halves = [judged.filter((_, i) => i % 2 === 0), judged.filter((_, i) => i % 2 === 1)]
  const crossFitted = Pwrm.calibration([
    ...atTemperature(halves[1], Pwrm.fitTemperature(halves[0])),
    ...atTemperature(halves[0], Pwrm.fitTemperature(halves[1]))
  ], 1)
  return {
    temperature,
    metrics: {
      accuracy: after.accuracy,
      before: { temperature: 1 as const, nll: before.nll, ece: before.ece },
      after: { temperature, nll: after.nll, ece: after.ece },
      crossFitted: { nll: crossFitted.nll, ece: crossFitted.ece }
    }
  }
}

/** Runs (or resumes, or finds finished) the training of a PWRM; returns its pwrm.json. */
export const train = Effect.fn("PwrmTrain.train")(function*(options: TrainOptions) {
  const { out, seq } = options
  yield* Effect.tryPromise({
    try: () => fs.mkdir(out, { recursive: true }),
    catch: (cause) => new CheckpointError({ file: out, reason: `cannot create folder (${String(cause)})` })
  })

  const base = yield* Pretrained.load(options.baseDir)
  const tokenizer = yield* Tokenizer.load(options.baseDir)
  // At least a token each for the prompt and the responses besides the separators; at most the base's positions.
  const [shortest, longest] = [Pwrm.overhead(tokenizer) + 3, base.config.maxPositionEmbeddings]
  if (seq < shortest || seq > longest) {
    return yield* new PreferenceError({ reason: `seq ${seq} is not between ${shortest} and ${longest} for ${options.baseDir}` })
  }
  const [pairs, heldout] = [yield* readPairs(options.data), yield* readPairs(options.heldout)]
  const data = {
    train: { file: options.data, sha256: yield* Files.sha256(options.data), pairs: pairs.length },
    heldout: { file: options.heldout, sha256: yield* Files.sha256(options.heldout), pairs: heldout.length }
  }
  const { steps, batch, seed, learningRate, warmupSteps, weightDecay, maxGradNorm } = options
  const identity = JSON.stringify({
    base: yield* Checkpoint.fingerprint(options.baseDir),
    train: data.train.sha256,
    heldout: data.heldout.sha256,
    seq,
    steps,
    batch,
    seed,
    learningRate,
    warmupSteps,
    weightDecay,
    maxGradNorm
  })

  const finished = (yield* Files.readJsonIfPresent(path.join(out, Pwrm.cardFile))) as Card | undefined
  if (finished !== undefined) {
    if (finished.identity === identity) return finished
    if (!options.replace) return yield* new CheckpointError({ file: out, reason: "holds a PWRM trained with other options, data or base; use another --out" })
    // Until the new PWRM is written, the folder must not pass for a finished one.
    yield* Files.remove(path.join(out, Pwrm.cardFile))
  }
  const resume = yield* RunFolder.resumePoint(out, State, {
    resume: options.resume,
    replace: options.replace,
    matches: (state) => state.identity === identity,
    differs: "options, data or base"
  })

  const start = resume === undefined
    ? Pwrm.scorer(base, yield* zeros([1, base.config.hiddenSize]))
    : Pwrm.scorer(yield* Pretrained.load(resume.dir), yield* Pwrm.loadHead(resume.dir, base.config.hiddenSize))
  const trainable = yield* Training.trainable(start)
  const adam = yield* Optimizer.make(trainable.variables, { ...Optimizer.defaultConfig, weightDecay }, resume?.moments)
  let step = resume?.state.step ?? 0
  yield* RunFolder.truncateMetrics(out, step)

  const pairAt = seededOrder(pairs, seed)
  const schedule: Optimizer.Schedule = { peak: learningRate, min: learningRate / 10, warmupSteps, totalSteps: steps }
  /**
   * The backbone (with the base's tokenizer files) and the head, for a checkpoint and the final folder
   * alike. Float32 whatever the base's dtype: the temperature is fitted on these exact weights.
   */
  const save = (dir: string) =>
    Effect.gen(function*() {
      yield* Pretrained.save(dir, Pwrm.backbone(trainable.model, base), { dtype: "F32", companionsFrom: options.baseDir })
      yield* Pwrm.saveHead(dir, trainable.model)
    })
  while (step < steps) {
    const started = performance.now()
    const group = Array.from({ length: batch }, (_, i) => pairAt(step * batch + i))
    const result = yield* Training.step(trainable, adam, [bothOrders(tokenizer, seq, group)], lossOf(Pwrm.padId(tokenizer)), {
      learningRate: Optimizer.learningRate(schedule, step),
      maxGradNorm
    })
    step++
    const metrics: StepMetrics = {
      step,
      loss: result.loss,
      accuracy: result.metrics.accuracy,
      lr: result.learningRate,
      grad_norm: result.gradNorm,
      pairs_per_s: batch / ((performance.now() - started) / 1000),
      epoch: Math.floor(((step - 1) * batch) / pairs.length)
    }
    yield* RunFolder.recordStep(out, options, step, metrics, { adam, state: () => ({ step, identity }), writeWeights: save })
  }

  const scores = yield* Effect.promise(() => Pwrm.scores(trainable.model, tokenizer, seq, heldout))
  const { temperature, metrics } = heldoutMetrics(scores.map((s, i) => ({ ...s, aWins: heldout[i].preferred === "a" })))
  yield* save(out)
  const card: Card = {
    format: "cascade-pwrm/1",
    seq,
    temperature,
    base: { dir: options.baseDir, configSha256: Config.hash(base.config) },
    data,
    heldoutMetrics: metrics,
    identity
  }
  yield* Files.writeJson(path.join(out, Pwrm.cardFile), card)
  yield* RunFolder.removeCheckpoint(out)
  return card
})

/** A zero tensor released with the scope: the untrained head, so that every pair starts at P = 1/2. */
const zeros = (shape: [number, number]) =>
  Effect.acquireRelease(Effect.sync(() => tf.zeros(shape) as tf.Tensor2D), (tensor) => Effect.sync(() => tensor.dispose()))

/**
 * GRPO (RECIPE.md section 4): reinforcement learning from verifiable rewards. Each step takes a
 * batch of prompts in a seeded order, samples G responses to each from the current policy, scores
 * them with the `Rewards` service, turns the rewards into group-relative advantages and makes K
 * policy updates on that rollout batch with the clipped objective (src/train/PolicyLoss.ts).
 *
 * - A sample the rewards could not judge (reward undefined) is left out of its group and counted.
 * - A group whose rewards are all equal is dropped and counted; a step that keeps none makes no update.
 * - The old policy's log-probabilities are recomputed in the training layout before the updates, not
 *   taken from generation, whose rows are left-padded: the first update's ratio is then exactly 1,
 *   Ministral 3's position-dependent query scaling included.
 * - The reference model is the starting checkpoint; its k3 KL is always reported and enters the
 *   loss only with `klCoef > 0`.
 *
 * Prompts are JSONL lines `{"prompt", "task"}`, the prompt text as the model reads it (chat markup
 * included; the tokenizer adds BOS), the task what `Rewards` checks the response against. Generation
 * ends at EOS, at `maxNewTokens`, or in a loop (Generate's loop detection).
 *
 * The run loop, shared with stages/Odpo.ts, writes to OUT as stages/Distill.ts does:
 * `metrics.jsonl` (a line per step), `checkpoint/` every `saveEvery` steps (weights, optimizer
 * moments, step, swapped in atomically) and at the end the policy as a Hugging Face checkpoint with
 * its tokenizer. A killed run given the same options resumes from its last checkpoint and ends where
 * an uninterrupted run ends: prompts and samples are seeded by (seed, step).
 */
import * as tf from "@tensorflow/tfjs"
import { Effect, Schema, type Scope, Stream } from "effect"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import * as Checkpoint from "../src/io/Checkpoint.ts"
import * as Dataset from "../src/data/Dataset.ts"
import * as ImageSide from "../src/data/ImageSide.ts"
import { CheckpointError, DataError } from "../src/Errors.ts"
import * as Files from "../src/io/Files.ts"
import * as Generate from "../src/model/Generate.ts"
import * as Model from "../src/model/Model.ts"
import * as Optimizer from "../src/train/Optimizer.ts"
import * as PolicyLoss from "../src/train/PolicyLoss.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Vision from "../src/model/Vision.ts"
import type { FloatDtype } from "../src/io/Safetensors.ts"
import * as Random from "../src/Random.ts"
import * as RunFolder from "../src/train/RunFolder.ts"
import { read } from "../src/io/Reference.ts"
import { Rewards, type Task } from "../src/rewards/Reward.ts"
import * as Tokenizer from "../src/io/Tokenizer.ts"
import * as Training from "../src/train/Training.ts"

// ---------------------------------------------------------------------------------------------
// GRPO

export interface GrpoOptions extends RunOptions {
  /** Samples per prompt (G). */
  readonly group: number
  readonly loss: PolicyLoss.GrpoOptions
  readonly std: PolicyLoss.StdNormalisation
  /** Policy updates (optimizer steps) per rollout batch (K). */
  readonly updates: number
  /** Groups per forward pass of an update (gradient accumulation over the rest). */
  readonly microBatch: number
  readonly onStep?: (metrics: GrpoMetrics) => void
}

export interface GrpoMetrics {
  readonly step: number
  /** Mean reward of the samples with a verdict; null when none had one. */
  readonly reward_mean: number | null
  /** Share of the samples with a verdict whose reward is 1. */
  readonly accuracy: number | null
  /** Samples without a verdict, left out of their groups. */
  readonly unscored: number
  /** Groups the updates used, and groups dropped: rewards all equal, one verdict or none included. */
  readonly groups: number
  readonly dropped_groups: number
  /** Means over the K updates; null when no group was kept. */
  readonly loss: number | null
  readonly clip_fraction: number | null
  readonly kl: number | null
  readonly grad_norm: number | null
  readonly lr: number
  /** Over all samples: mean generated tokens, and the shares caught in a loop and cut at maxNewTokens. */
  readonly response_length: number
  readonly loop_rate: number
  readonly truncation_rate: number
  readonly seconds: number
}

/** The task kinds of src/rewards/Reward.ts, as the prompt file states them. */
const TaskSchema = Schema.Union([
  Schema.Struct({ kind: Schema.Literal("numeric"), answer: Schema.String }),
  Schema.Struct({ kind: Schema.Literal("exact"), answer: Schema.String }),
  Schema.Struct({ kind: Schema.Literal("format"), pattern: Schema.String }),
  Schema.Struct({ kind: Schema.Literal("code"), entry: Schema.String, tests: Schema.String }),
  Schema.Struct({ kind: Schema.Literal("rubric"), items: Schema.Array(Schema.String) })
])
/**
 * A line of a GRPO prompt file: the prompt as the model reads it, what checks a response, and for a
 * Mistral 3 policy the images of the prompt's placeholders (files relative to the prompt file).
 */
export const GrpoPrompt = Schema.Struct({ prompt: Schema.String, task: TaskSchema, images: Schema.optional(Schema.Array(Schema.String)) })

/** A micro-batch of the updates: whole groups, with what the loss needs of each response. */
interface GrpoMicroBatch {
  readonly completions: ReadonlyArray<PolicyLoss.Completion>
  readonly rows: ReadonlyArray<PolicyLoss.GrpoRow>
}

/** Runs (or resumes, or finds finished) GRPO; returns the final state. */
export const grpo = Effect.fn("Grpo.grpo")(function*(options: GrpoOptions) {
  const prompts = yield* readPrompts(options.prompts, GrpoPrompt)
  const rewards = yield* Rewards
  const identity = { group: options.group, loss: options.loss, std: options.std, updates: options.updates, microBatch: options.microBatch, rewards: rewards.describe }
  return yield* runOnline(options, { format: "cascade-grpo/1", identity, prompts, differs: "rewards" }, grpoStep(options), options.onStep)
})

const grpoStep = (options: GrpoOptions) =>
  Effect.fnUntraced(function*(run: Run, prompts: ReadonlyArray<{ readonly prompt: string; readonly task: Task; readonly images?: ReadonlyArray<string> }>, step: number, seed: number) {
    const rewards = yield* Rewards
    const started = performance.now()
    const groups = yield* sample(run, prompts, options.group, {
      maxNewTokens: options.maxNewTokens,
      temperature: options.temperature,
      seed,
      loop: options.loop
    })
    const scores = yield* Effect.forEach(
      groups.flatMap((group, g) => group.map((sampled) => ({ sampled, g }))),
      ({ sampled, g }) => rewards.score({ prompt: prompts[g].prompt, response: sampled.text, task: prompts[g].task }),
      { concurrency: 16 }
    )
    const rewardOf = (g: number, i: number) => scores[g * options.group + i].reward
    const judged = groups.map((group, g) => group.flatMap((sampled, i) => {
      const reward = rewardOf(g, i)
      return reward === undefined ? [] : [{ sampled, reward }]
    }))
    const advantages = PolicyLoss.advantages(judged.map((group) => group.map((s) => s.reward)), options.std)
    const kept = judged.flatMap((group, g) => {
      const groupAdvantages = advantages[g]
      return groupAdvantages === undefined ? [] : [group.map((s, i) => ({ completion: s.sampled.completion, advantage: groupAdvantages[i], group: g }))]
    })

    // Old-policy and reference log-probabilities, per micro-batch of whole groups, before any update.
    const microBatches: Array<GrpoMicroBatch> = []
    for (const chunk of chunks(kept, options.microBatch)) {
      const completions = chunk.flat().map((s) => s.completion)
      const old = yield* perToken(run.policy.model, completions)
      const ref = yield* perToken(run.reference, completions)
      const rows = chunk.flat().map((s, i) => ({ group: s.group, advantage: s.advantage, oldLogProbs: old[i], refLogProbs: ref[i] }))
      microBatches.push({ completions, rows })
    }
    const lr = options.learningRate
    const updates: Array<Training.StepResult> = []
    for (let k = 0; microBatches.length > 0 && k < options.updates; k++) {
      updates.push(yield* Training.step(run.policy, run.adam, microBatches, (model, batch: GrpoMicroBatch) =>
        PolicyLoss.grpo(PolicyLoss.responseLogProbs(model, batch.completions), batch.rows, options.loss), {
        learningRate: lr,
        maxGradNorm: options.maxGradNorm
      }))
    }

    const all = groups.flat()
    const verdicts = judged.flat().map((s) => s.reward)
    const meanOf = (values: ReadonlyArray<number>) => (values.length === 0 ? null : values.reduce((a, b) => a + b, 0) / values.length)
    return {
      step: step + 1,
      reward_mean: meanOf(verdicts),
      accuracy: meanOf(verdicts.map((reward) => (reward === 1 ? 1 : 0))),
      unscored: all.length - verdicts.length,
      groups: kept.length,
      dropped_groups: judged.length - kept.length,
      loss: meanOf(updates.map((u) => u.loss)),
      clip_fraction: meanOf(updates.map((u) => u.metrics.clip_fraction)),
      kl: meanOf(updates.map((u) => u.metrics.kl)),
      grad_norm: meanOf(updates.map((u) => u.gradNorm)),
      lr,
      response_length: meanOf(all.map((s) => s.completion.response.length)) ?? 0,
      loop_rate: meanOf(all.map((s) => (s.loops ? 1 : 0))) ?? 0,
      truncation_rate: meanOf(all.map((s) => (s.finishReason === "length" ? 1 : 0))) ?? 0,
      seconds: (performance.now() - started) / 1000
    } satisfies GrpoMetrics
  })

/** Per response token log-probabilities under `model`, one array per completion (its response's length). */
const perToken = Effect.fnUntraced(function*(model: Model.Model, completions: ReadonlyArray<PolicyLoss.Completion>) {
  const values = yield* read(PolicyLoss.responseLogProbs(model, completions))
  const r = values.length / completions.length
  return completions.map((c, i) => Array.from(values.subarray(i * r, i * r + c.response.length)))
})

// ---------------------------------------------------------------------------------------------
// The online run, shared with stages/Odpo.ts: prompts, sampling, and the run folder.

export interface RunOptions extends RunFolder.Options {
  /** The starting policy, also the reference; its folder must hold a tokenizer. */
  readonly modelDir: string
  /** JSONL of prompts. */
  readonly prompts: string
  readonly out: string
  readonly steps: number
  /** Seeds the prompt order and the sampling. */
  readonly seed: number
  /** Prompts per step. */
  readonly batch: number
  readonly maxNewTokens: number
  readonly temperature: number
  /** Responses caught in a loop end there and are flagged. */
  readonly loop: Generate.LoopDetection
  /** Constant: the policy moves by its own samples, so no schedule is tied to a data set. */
  readonly learningRate: number
  readonly weightDecay: number
  readonly maxGradNorm: number | undefined
  /** Dtype of the written model; the starting model's by default. */
  readonly dtype?: FloatDtype | undefined
}

/** A default for `RunOptions.loop`: the last 32 tokens repeat a cycle of at most 8. */
export const defaultLoop: Generate.LoopDetection = { window: 32, maxPeriod: 8, stop: true }

/**
 * What a step works with: the policy being trained and its optimizer, the frozen reference, the
 * tokenizer, and a Mistral 3 policy's image side (frozen, so the reference's too).
 */
export interface Run {
  readonly policy: Training.Trainable
  readonly adam: Optimizer.AdamW
  readonly reference: Model.Model
  readonly tokenizer: Tokenizer.Tokenizer
  readonly images: ImageSide.ImageSide | undefined
  /** The prompt file, which prompts' image files are relative to and errors name. */
  readonly promptFile: string
}

/** The lines of a prompt file, decoded by `schema`, each with its line number; a line that does not fit fails naming it. */
export const readPrompts = <A extends { readonly prompt: string }>(file: string, schema: Schema.Decoder<A>) =>
  Effect.gen(function*() {
    const decode = Schema.decodeUnknownEffect(schema)
    const prompts = yield* Dataset.lines(file).pipe(
      Stream.mapEffect(({ line, text }) =>
        Effect.try({ try: () => JSON.parse(text) as unknown, catch: () => new DataError({ file, line, reason: "is not valid JSON" }) }).pipe(
          Effect.flatMap(decode),
          Effect.map((prompt) => ({ ...prompt, line })),
          Effect.mapError((error) => (error instanceof DataError ? error : new DataError({ file, line, reason: error.message })))
        )
      ),
      Stream.runCollect
    )
    if (prompts.length === 0) return yield* new DataError({ file, reason: "holds no prompt" })
    return prompts
  })

/** (seed, step) or (seed, epoch) mixed into one 32-bit seed. */
const mixSeeds = (seed: number, step: number) => (Math.imul(seed + 1, 0x9e3779b1) ^ Math.imul(step + 1, 0x85ebca6b)) >>> 0

/** The prompts of step `step`: `batch` at a time through permutations of the file seeded by (seed, epoch). */
const promptsOfStep = <A>(prompts: ReadonlyArray<A>, seed: number, batch: number, step: number): Array<A> => {
  const order = new Map<number, Array<number>>()
  return Array.from({ length: batch }, (_, j) => {
    const position = step * batch + j
    const epoch = Math.floor(position / prompts.length)
    if (!order.has(epoch)) order.set(epoch, Random.permutation(prompts.length, Random.uniform(mixSeeds(seed, epoch))))
    return prompts[order.get(epoch)![position % prompts.length]]
  })
}

/** A response sampled for a prompt. */
export interface Sampled {
  readonly completion: PolicyLoss.Completion
  /** Decoded with its special tokens (thinking markup included), without the final EOS. */
  readonly text: string
  readonly loops: boolean
  readonly finishReason: Generate.FinishReason
}

/** A prompt to sample from: its text and, for a Mistral 3 policy, its images (files relative to the prompt file, whose line it is). */
export interface Prompted {
  readonly prompt: string
  readonly images?: ReadonlyArray<string> | undefined
  readonly line?: number
}

/**
 * `copies` responses to each prompt from the policy, seeded: one group per prompt. A prompt's images
 * are seen through the policy's image side; their features live with the step's scope.
 */
export const sample = Effect.fnUntraced(function*(
  run: Run,
  prompts: ReadonlyArray<Prompted>,
  copies: number,
  options: { readonly maxNewTokens: number; readonly temperature: number; readonly seed: number; readonly loop: Generate.LoopDetection }
) {
  const { tokenizer, images } = run
  const prepared = yield* Effect.forEach(prompts, ({ prompt, images: files, line = 0 }) =>
    ImageSide.prepare(run.promptFile, images)({ line, ids: tokenizer.encode(prompt), imageFiles: files?.map((file) => path.resolve(path.dirname(run.promptFile), file)) }))
  const features = yield* Effect.forEach(prepared, (p) => (p.images.length === 0 || images === undefined ? Effect.succeed(undefined) : ImageSide.projected(images, p.images)))
  const seen = features.flatMap((f) => (f === undefined ? [] : new Array<tf.Tensor2D>(copies).fill(f.features)))
  const imageFeatures = seen.length === 0 ? undefined : yield* Effect.acquireRelease(
    Effect.sync(() => ({ features: tf.concat(seen, 0) as tf.Tensor2D, tokenId: images!.tokens.image })),
    ({ features }) => Effect.sync(() => features.dispose())
  )
  const generations = yield* Generate.generate(run.policy.model, prepared.flatMap(({ ids }) => new Array<ReadonlyArray<number>>(copies).fill(ids)), {
    ...options,
    stopTokenIds: tokenizer.eosId === undefined ? [] : [tokenizer.eosId],
    decode: (ids) => tokenizer.decode(ids),
    imageFeatures
  })
  return prepared.map(({ ids: prompt }, g) =>
    generations.slice(g * copies, (g + 1) * copies).map((generation): Sampled => ({
      completion: { prompt, response: generation.tokens, ...(features[g] === undefined ? {} : { images: features[g] }) },
      text: generation.text ?? "",
      loops: generation.loopPeriod !== undefined,
      finishReason: generation.finishReason
    }))
  )
})

/** Consecutive runs of at most `size` items. */
export const chunks = <A>(items: ReadonlyArray<A>, size: number): Array<Array<A>> =>
  Array.from({ length: Math.ceil(items.length / size) }, (_, i) => items.slice(i * size, (i + 1) * size))

/**
 * Loads the policy and the reference, resumes from OUT's checkpoint when asked, then runs the steps
 * from where it stands (each in its own scope, so that its tensors go with it), appending each
 * step's metrics, checkpointing every `saveEvery` steps, and saves the policy at the end.
 */
export const runOnline = Effect.fn("Grpo.runOnline")(function*<P extends { readonly prompt: string }, M extends { readonly step: number }, E, R>(
  options: RunOptions,
  setup: {
    readonly format: string
    readonly identity: Record<string, unknown>
    readonly prompts: ReadonlyArray<P>
    /** What else a run of other identity may differ in, for errors (the rewards, the PWRM). */
    readonly differs: string
  },
  /** Step `step` (from 0) on its prompts, sampling with `seed`. */
  step: (run: Run, prompts: ReadonlyArray<P>, step: number, seed: number) => Effect.Effect<M, E, R | Scope.Scope>,
  onStep: ((metrics: M) => void) | undefined
) {
  const { out } = options
  yield* Effect.tryPromise({ try: () => fs.mkdir(out, { recursive: true }), catch: io(out, "cannot create folder") })
  const reference = yield* Pretrained.load(options.modelDir)
  const tokenizer = yield* Tokenizer.load(options.modelDir)
  const identity = JSON.stringify({
    model: yield* Checkpoint.fingerprint(options.modelDir),
    prompts: yield* Files.sha256(options.prompts),
    steps: options.steps,
    seed: options.seed,
    batch: options.batch,
    maxNewTokens: options.maxNewTokens,
    temperature: options.temperature,
    loop: options.loop,
    learningRate: options.learningRate,
    weightDecay: options.weightDecay,
    maxGradNorm: options.maxGradNorm,
    dtype: options.dtype,
    ...setup.identity
  })

  // state.json beside the model is written last: a finished run.
  const finished = yield* RunFolder.readState(path.join(out, "state.json"), State)
  const differs = `options, prompts, model or ${setup.differs}`
  if (finished !== undefined) {
    if (finished.identity === identity && finished.format === setup.format) return finished
    if (!options.replace) return yield* new CheckpointError({ file: out, reason: `holds a finished run with other ${differs}; use another --out` })
    // Until the new run ends, the folder must not pass for a finished one.
    yield* Files.remove(path.join(out, "state.json"))
  }
  const resume = yield* RunFolder.resumePoint(out, State, {
    resume: options.resume,
    replace: options.replace,
    matches: (state) => state.identity === identity && state.format === setup.format,
    differs
  })
  const { trainable: policy, adam } = yield* Training.startFrom(reference, resume, options.weightDecay)
  const run: Run = { policy, adam, reference, tokenizer, images: yield* ImageSide.of(options.modelDir, tokenizer), promptFile: options.prompts }
  const first = resume?.state.step ?? 0
  yield* RunFolder.truncateMetrics(out, first)

  for (let s = first; s < options.steps; s++) {
    const prompts = promptsOfStep(setup.prompts, options.seed, options.batch, s)
    const metrics = yield* step(run, prompts, s, mixSeeds(options.seed, s)).pipe(Effect.scoped)
    yield* RunFolder.recordStep(out, { saveEvery: options.saveEvery, steps: options.steps, onStep }, s + 1, metrics, {
      adam,
      state: (): State => ({ format: setup.format, step: s + 1, identity }),
      writeWeights: (dir) => Pretrained.save(dir, policy.model, { dtype: "F32" })
    })
  }

  // A Mistral 3 model's image side, untouched by text training, saved with it: the output stays whole.
  yield* Pretrained.save(out, policy.model, { dtype: options.dtype ?? Pretrained.storedDtype(reference.config), companionsFrom: options.modelDir, vision: yield* Vision.loadIfPresent(options.modelDir) })
  const done: State = { format: setup.format, step: options.steps, identity }
  yield* Files.writeJson(path.join(out, "state.json"), done)
  yield* RunFolder.removeCheckpoint(out)
  return done
})

// ---------------------------------------------------------------------------------------------
// The run's state (src/train/RunFolder.ts keeps the folder).

const State = Schema.Struct({ format: Schema.String, step: Schema.Int, identity: Schema.String })
type State = typeof State.Type

const io = (file: string, what: string) => (cause: unknown) => new CheckpointError({ file, reason: `${what} (${String(cause)})` })

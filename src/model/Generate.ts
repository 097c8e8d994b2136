/**
 * Sampling from a model with its KV cache: temperature (0 = greedy), top-p, stop token ids and stop
 * strings, seeded randomness, log-probabilities of what was sampled and of the prompt, loop detection.
 *
 * Rows of a batch are left-padded to the longest prompt and decoded together. Model.forward places a
 * token at its index in the padded row, so a padded row's positions are shifted by its padding. RoPE
 * depends only on the distance between positions, so this changes a row's logits by float rounding
 * alone (equal-length rows are exact), with one exception: Ministral 3's query scaling grows with the
 * absolute position, so there a row whose padded positions cross a multiple of the original context
 * length differs from that row run alone. Pass `batchSize: 1` for rows that must be exact.
 *
 * Log-probabilities are those of the model's own distribution (log-softmax of the logits), before
 * temperature and top-p change it, as vLLM reports them by default.
 *
 * Tensors live only while a generation runs: the KV cache and every intermediate are disposed
 * however it ends, failure and interruption included.
 */
import * as tf from "@tensorflow/tfjs"
import { Effect } from "effect"
import * as Model from "./Model.ts"
import * as Random from "../Random.ts"

export interface LoopDetection {
  /** How many of the latest tokens must repeat a cycle. */
  readonly window: number
  /** The longest cycle looked for; cycles longer than window / 2 are not, as they would not show twice. */
  readonly maxPeriod: number
  /** End the generation as soon as a loop shows (finish reason "loop"); otherwise it is only flagged. */
  readonly stop?: boolean
}

export interface Options {
  readonly maxNewTokens: number
  /** Divides the logits before sampling; 0 picks the most likely token. Default 1. */
  readonly temperature?: number
  /** Samples from the smallest set of most likely tokens whose probability reaches `topP`. Default 1. */
  readonly topP?: number
  /** Row i draws from its own stream seeded by (seed, i): the same seed gives the same samples. */
  readonly seed?: number
  /** Tokens that end a row; the stop token is part of its tokens but not of its text. */
  readonly stopTokenIds?: ReadonlyArray<number>
  /** Texts that end a row as soon as its decoded text holds one; the text is cut before it. Needs `decode`. */
  readonly stopStrings?: ReadonlyArray<string>
  /** Turns tokens into text, for stop strings and `Generation.text`. */
  readonly decode?: (ids: ReadonlyArray<number>) => string
  /** How many most likely alternatives to report per sampled token. Default 0. */
  readonly topLogprobs?: number
  /** Score the prompt too, reporting this many alternatives per position. */
  readonly promptLogprobs?: number
  readonly loop?: LoopDetection
  /** Rows decoded together at most, to bound memory. Default: all. */
  readonly batchSize?: number
  /**
   * A Mistral 3 model's projected image features for the prompts' image tokens, in order
   * (Model.ForwardOptions): spliced in by the prompts' pass; the image token is then never sampled.
   * The prompts must make one batch.
   */
  readonly imageFeatures?: Model.ForwardOptions["imageFeatures"]
}

export interface Candidate {
  readonly token: number
  readonly logprob: number
}

export interface TokenLogprob extends Candidate {
  /** How many tokens are at least as likely, itself included (vLLM's rank: 1 for the most likely). */
  readonly rank: number
  /** The most likely tokens, best first. */
  readonly top: ReadonlyArray<Candidate>
}

export type FinishReason = "stop" | "length" | "loop"

export interface Generation {
  /** The sampled tokens, a stop token included. */
  readonly tokens: ReadonlyArray<number>
  readonly logprobs: ReadonlyArray<TokenLogprob>
  readonly finishReason: FinishReason
  /** The stop token id or stop string that ended the row, if one did. */
  readonly stopReason: number | string | undefined
  /** The decoded tokens, without a stop token and cut before a stop string; undefined without `decode`. */
  readonly text: string | undefined
  /** The period of the first loop seen, whether or not it stopped the row. */
  readonly loopPeriod: number | undefined
  /** With `promptLogprobs`: the scores of the prompt's tokens; the first token has none. */
  readonly promptLogprobs: ReadonlyArray<TokenLogprob | undefined> | undefined
}

/**
 * Generates a continuation of every prompt (token ids, at least one each), `batchSize` rows at a
 * time, one result per prompt in order.
 */
export const generate = Effect.fn("Generate.generate")(function*(
  model: Model.Model,
  prompts: ReadonlyArray<ReadonlyArray<number>>,
  options: Options
) {
  if (prompts.some((prompt) => prompt.length === 0)) return yield* Effect.die(new Error("Generate.generate: empty prompt"))
  const size = options.batchSize ?? Math.max(1, prompts.length)
  if (options.imageFeatures !== undefined && prompts.length > size) {
    return yield* Effect.die(new Error(`Generate.generate: image features for ${prompts.length} prompts in batches of ${size}`))
  }
  const seed = options.seed ?? Math.floor(Math.random() * 2 ** 32)
  const results: Array<Generation> = []
  for (let first = 0; first < prompts.length; first += size) {
    const rows = prompts.slice(first, first + size).map((prompt, i) => newRow(prompt, Random.uniform(mixSeed(seed, first + i))))
    yield* decodeBatch(model, rows, options)
    results.push(...rows.map((row) => finish(row, options)))
  }
  return results
})

/** What a row accumulates while it is decoded (also by the server's continuous batcher). */
export interface Row {
  readonly prompt: ReadonlyArray<number>
  readonly random: () => number
  readonly tokens: Array<number>
  readonly logprobs: Array<TokenLogprob>
  finishReason: FinishReason | undefined
  stopReason: number | string | undefined
  /** Set when a stop string cut it. */
  text: string | undefined
  loopPeriod: number | undefined
  promptLogprobs: Array<TokenLogprob | undefined> | undefined
}

export const newRow = (prompt: ReadonlyArray<number>, random: () => number): Row => ({
  prompt,
  random,
  tokens: [],
  logprobs: [],
  finishReason: undefined,
  stopReason: undefined,
  text: undefined,
  loopPeriod: undefined,
  promptLogprobs: undefined
})

/** Runs the rows' prompts and decodes until every row has finished, filling in the rows. */
const decodeBatch = (model: Model.Model, rows: ReadonlyArray<Row>, options: Options): Effect.Effect<void> => {
  if (options.maxNewTokens === 0 && options.promptLogprobs === undefined) return Effect.void
  const vocab = model.config.vocabSize
  const width = Math.max(...rows.map((row) => row.prompt.length))
  const padding = rows.map((row) => width - row.prompt.length)
  const ids = rows.map((row, i) => [...new Array<number>(padding[i]).fill(0), ...row.prompt])
  const attentionMask = padding.map((pad) => Array.from({ length: width }, (_, j) => (j < pad ? 0 : 1)))
  const promptTargets = ids.flatMap((row) => row.slice(1))

  // Every tensor that outlives a synchronous step is held here until disposed, so that the
  // finalizer releases whatever a failure or an interruption leaves behind.
  const live = new Set<tf.Tensor>()
  let cache: Model.KVCache | undefined
  const hold = <T extends tf.Tensor>(tensor: T): T => (live.add(tensor), tensor)
  const release = (tensors: ReadonlyArray<tf.Tensor>) => {
    for (const tensor of tensors) {
      tensor.dispose()
      live.delete(tensor)
    }
  }
  /** Model.forward after the cache, keeping the new cache; the logits are held. */
  const forward = (tokens: ReadonlyArray<ReadonlyArray<number>>, forwardOptions: Model.ForwardOptions) => {
    const out = Model.forward(model, tokens, { ...forwardOptions, cache })
    cache = out.cache
    return hold(out.logits)
  }
  /** Reads scores computed on the device back, releasing their tensors. */
  const read = Effect.fnUntraced(function*(tensors: ScoreTensors, targets: ReadonlyArray<number>) {
    const values = yield* Effect.promise(() => Promise.all(tensors.map((tensor) => tensor.data())))
    release(tensors)
    return parseScores(values, targets)
  })

  return Effect.gen(function*() {
    // The prompts in one pass; the cache is kept only when a second token is to follow.
    const prefill = yield* Effect.sync(() => {
      // Without prompt scores only the last position's logits are needed, not [B, width, V].
      const logits = forward(ids, {
        attentionMask,
        useCache: options.maxNewTokens > 1,
        lastLogitsOnly: options.promptLogprobs === undefined,
        imageFeatures: options.imageFeatures
      })
      const k = options.promptLogprobs
      const prompt = k === undefined || width === 1 ? undefined : scorePrompt(logits, promptTargets, k).map(hold) as ScoreTensors
      const last = options.maxNewTokens > 0 ? hold(lastLogProbs(logits)) : undefined
      release([logits])
      return { prompt, last }
    })
    if (options.promptLogprobs !== undefined) {
      const scores = prefill.prompt ? yield* read(prefill.prompt, promptTargets) : []
      rows.forEach((row, i) => {
        // Token j >= 1 of row i is predicted at padded position padding[i] + j - 1.
        const offset = i * (width - 1) + padding[i] - 1
        row.promptLogprobs = row.prompt.map((_, j) => (j === 0 ? undefined : scores[offset + j]))
      })
    }
    let logProbs = prefill.last
    while (logProbs !== undefined) {
      // Reading tensors back settles in microtasks: yield so that I/O, timers and interruption get a turn.
      yield* Effect.yieldNow
      const current = logProbs
      const values = (yield* Effect.promise(() => current.data())) as Float32Array
      // An image token sampled after prompts with images would have no features when the rows are read again (GRPO's loss).
      const banned = options.imageFeatures?.tokenId
      if (banned !== undefined) rows.forEach((_, i) => (values[i * vocab + banned] = -Infinity))
      const sampled = rows.map((row, i) =>
        row.finishReason === undefined ? sample(values.subarray(i * vocab, (i + 1) * vocab), options, row.random) : 0
      )
      const scored = yield* Effect.sync(() => score(current, sampled, options.topLogprobs ?? 0).map(hold) as ScoreTensors)
      const scores = yield* read(scored, sampled)
      release([current])
      rows.forEach((row, i) => {
        if (row.finishReason === undefined) advance(row, scores[i], options)
      })
      // Finished rows ride along until the last one is done; what they sample is ignored.
      logProbs = rows.every((row) => row.finishReason !== undefined) ? undefined : yield* Effect.sync(() => {
        const logits = forward(sampled.map((token) => [token]), { useCache: true })
        const last = hold(lastLogProbs(logits))
        release([logits])
        return last
      })
    }
  }).pipe(
    Effect.ensuring(Effect.sync(() => {
      tf.dispose([...live])
      if (cache) Model.disposeCache(cache)
    }))
  )
}

/**
 * Scores the prompt: the log-probabilities at positions 0..T-2 of logits [B, T, V] against the
 * tokens that follow (`targets`, B * (T - 1) of them, row by row).
 */
export const scorePrompt = (logits: tf.Tensor3D, targets: ReadonlyArray<number>, k: number): ScoreTensors =>
  tf.tidy(() => {
    const [b, t, v] = logits.shape
    const logProbs = tf.logSoftmax(logits.slice([0, 0, 0], [b, t - 1, v]))
    return score(logProbs.reshape([b * (t - 1), v]), targets, k)
  })

/** [B, T, V] logits -> [B, V] log-probabilities at the last position. */
export const lastLogProbs = (logits: tf.Tensor3D): tf.Tensor2D =>
  tf.tidy(() => {
    const [b, t, v] = logits.shape
    return tf.logSoftmax(logits.slice([0, t - 1, 0], [b, 1, v]).reshape([b, v]))
  })

/** Target log-probs [N], ranks [N] and the top k's log-probs and ids [N, k]. */
export type ScoreTensors = [tf.Tensor1D, tf.Tensor1D, tf.Tensor2D, tf.Tensor2D]

/**
 * Scores `targets[i]` (given, or sampled on the device) against row i of `logProbs` [N, V] on the
 * device, so that only N * (2k + 2) numbers come back. (gatherND: tfjs-backend-wasm's gather with
 * batchDims returns wrong values.)
 */
export const score = (logProbs: tf.Tensor2D, targets: ReadonlyArray<number> | tf.Tensor1D, k: number): ScoreTensors =>
  tf.tidy(() => {
    const n = logProbs.shape[0]
    const indices = Array.isArray(targets)
      ? tf.tensor2d(targets.flatMap((target, i) => [i, target]), [n, 2], "int32")
      : tf.stack([tf.range(0, n, 1, "int32"), tf.cast(targets as tf.Tensor1D, "int32")], 1)
    const chosen = tf.gatherND(logProbs, indices) as tf.Tensor1D
    const rank = tf.sum(tf.cast(tf.greaterEqual(logProbs, chosen.reshape([n, 1])), "int32"), 1) as tf.Tensor1D
    const top = tf.topk(logProbs, k)
    return [chosen, rank, top.values, top.indices]
  })

export const parseScores = (values: ReadonlyArray<tf.TypedArray>, targets: ReadonlyArray<number>): Array<TokenLogprob> => {
  const [chosen, rank, topValues, topIds] = values
  const k = topIds.length / targets.length
  return targets.map((token, i) => ({
    token,
    logprob: chosen[i],
    rank: rank[i],
    top: Array.from({ length: k }, (_, j) => ({ token: topIds[i * k + j], logprob: topValues[i * k + j] }))
  }))
}

/** Draws a token from one row of log-probabilities at the options' temperature and top-p. */
const sample = (logProbs: Float32Array, options: Options, random: () => number): number => {
  let best = 0
  for (let i = 1; i < logProbs.length; i++) if (logProbs[i] > logProbs[best]) best = i
  const temperature = options.temperature ?? 1
  if (temperature === 0) return best
  // Probabilities at this temperature relative to the best token's, unnormalised.
  const weights = Float64Array.from(logProbs, (logProb) => Math.exp((logProb - logProbs[best]) / temperature))
  const topP = options.topP ?? 1
  const candidates = topP < 1 ? nucleus(weights, topP) : undefined
  const count = candidates?.length ?? weights.length
  let total = 0
  for (let j = 0; j < count; j++) total += weights[candidates?.[j] ?? j]
  let u = random() * total
  for (let j = 0; j < count; j++) {
    u -= weights[candidates?.[j] ?? j]
    if (u < 0) return candidates?.[j] ?? j
  }
  return candidates?.[count - 1] ?? count - 1 // u was within rounding of the total
}

/** The smallest set of most likely tokens whose probability reaches `topP`, most likely first. */
const nucleus = (weights: Float64Array, topP: number): Array<number> => {
  const order = Array.from(weights.keys()).sort((a, b) => weights[b] - weights[a])
  let total = 0
  for (const weight of weights) total += weight
  let mass = 0
  let kept = 0
  while (kept < order.length && mass < topP * total) mass += weights[order[kept++]]
  return order.slice(0, kept)
}

/** Appends a sampled token to its row and decides whether the row is finished. */
export const advance = (row: Row, scored: TokenLogprob, options: Options) => {
  row.tokens.push(scored.token)
  row.logprobs.push(scored)
  if (options.stopTokenIds?.includes(scored.token)) {
    row.finishReason = "stop"
    row.stopReason = scored.token
    return
  }
  if (options.stopStrings?.length && options.decode) {
    const text = options.decode(row.tokens)
    const hit = firstStop(text, options.stopStrings)
    if (hit) {
      row.finishReason = "stop"
      row.stopReason = hit.stop
      row.text = text.slice(0, hit.index)
      return
    }
  }
  if (options.loop) {
    const period = loopPeriod(row.tokens, options.loop)
    row.loopPeriod ??= period
    if (period !== undefined && options.loop.stop) {
      row.finishReason = "loop"
      return
    }
  }
  if (row.tokens.length >= options.maxNewTokens) row.finishReason = "length"
}

/** The stop string that occurs first in `text`, and where. */
const firstStop = (text: string, stops: ReadonlyArray<string>) => {
  let hit: { stop: string; index: number } | undefined
  for (const stop of stops) {
    const index = stop === "" ? -1 : text.indexOf(stop)
    if (index >= 0 && (hit === undefined || index < hit.index)) hit = { stop, index }
  }
  return hit
}

export const finish = (row: Row, options: Options): Generation => {
  const stoppedByToken = typeof row.stopReason === "number"
  return {
    tokens: row.tokens,
    logprobs: row.logprobs,
    finishReason: row.finishReason ?? "length",
    stopReason: row.stopReason,
    text: row.text ?? options.decode?.(stoppedByToken ? row.tokens.slice(0, -1) : row.tokens),
    loopPeriod: row.loopPeriod,
    promptLogprobs: row.promptLogprobs
  }
}

/**
 * The shortest period p <= maxPeriod with which the last `window` tokens repeat (each equals the one
 * p before it), or undefined. Periods above window / 2 are not tried: such a cycle would not show twice.
 */
export const loopPeriod = (
  tokens: ReadonlyArray<number>,
  { window, maxPeriod }: { readonly window: number; readonly maxPeriod: number }
): number | undefined => {
  if (tokens.length < window) return undefined
  const start = tokens.length - window
  for (let period = 1; period <= Math.min(maxPeriod, Math.floor(window / 2)); period++) {
    let repeats = true
    for (let i = start + period; i < tokens.length && repeats; i++) repeats = tokens[i] === tokens[i - period]
    if (repeats) return period
  }
  return undefined
}

const THINK_OPEN = "[THINK]"
const THINK_CLOSE = "[/THINK]"

/**
 * Separates the `[THINK] ... [/THINK]` chunks of a text (decoded with its special tokens) from the
 * rest: their contents in order, and the text without them. A chunk left open (the generation ended
 * while thinking) runs to the end; a closing tag before any opening one closes a chunk that the
 * prompt opened, so the text up to it is thinking.
 */
export const splitThinking = (text: string): { readonly thinking: Array<string>; readonly answer: string } => {
  const thinking: Array<string> = []
  let answer = ""
  const firstClose = text.indexOf(THINK_CLOSE)
  const firstOpen = text.indexOf(THINK_OPEN)
  let at = 0
  if (firstClose >= 0 && (firstOpen < 0 || firstClose < firstOpen)) {
    thinking.push(text.slice(0, firstClose))
    at = firstClose + THINK_CLOSE.length
  }
  while (at < text.length) {
    const open = text.indexOf(THINK_OPEN, at)
    if (open < 0) break
    answer += text.slice(at, open)
    const close = text.indexOf(THINK_CLOSE, open + THINK_OPEN.length)
    thinking.push(text.slice(open + THINK_OPEN.length, close < 0 ? text.length : close))
    at = close < 0 ? text.length : close + THINK_CLOSE.length
  }
  return { thinking, answer: answer + text.slice(at) }
}

/** A 32-bit seed for row `row` from a user's seed (any integer up to 2^53), well mixed. */
export const mixSeed = (seed: number, row: number) => {
  let h = (seed >>> 0) ^ Math.imul(Math.floor(seed / 2 ** 32) >>> 0, 0x9e3779b1) ^ Math.imul(row + 1, 0x85ebca6b)
  // murmur3's finaliser: every input bit affects every output bit.
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b)
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35)
  return (h ^ (h >>> 16)) >>> 0
}

/**
 * The pairwise reward model (PWRM): the probability that response A beats response B for a prompt,
 * the soft label of online DPO (RECIPE.md sections 3-4).
 *
 * A backbone (any checkpoint the engine loads) reads the pair as one sequence,
 *
 *     <bos>{prompt}\n[A] {a}\n[B] {b}\nBetter:
 *
 * with `[THINK] ... [/THINK]` chunks stripped from both responses, and a scalar linear head on the
 * final normed hidden state of the last token gives z(A, B), the logit of P(A beats B). That is
 * transformers' MistralForSequenceClassification with one label (`score.weight`, [1, D], no bias).
 * The head takes the LM head's place in the model, so `Model.forward`'s logits are the score at every
 * position, [B, T, 1]: the [B, T, V] vocabulary logits, most of the cost with a large vocabulary,
 * are never computed.
 *
 * The probability is order-symmetrised and calibrated by a temperature tau fitted on held-out pairs:
 *
 *     P(A, B) = (sigmoid(z(A,B) / tau) + 1 - sigmoid(z(B,A) / tau)) / 2,    so P(A, B) = 1 - P(B, A).
 *
 * A PWRM folder is an ordinary Hugging Face checkpoint of the backbone (its LM head the base's,
 * unused) with its tokenizer, plus `pwrm-head.safetensors` and `pwrm.json` (tau, the sequence
 * length, metrics and provenance).
 */
import * as tf from "@tensorflow/tfjs"
import { Effect, Schema } from "effect"
import * as path from "node:path"
import { CheckpointError } from "../Errors.ts"
import * as Files from "../io/Files.ts"
import { splitThinking } from "../model/Generate.ts"
import * as Model from "../model/Model.ts"
import * as Pretrained from "../io/Pretrained.ts"
import * as Safetensors from "../io/Safetensors.ts"
import * as Tokenizer from "../io/Tokenizer.ts"

export interface Pair {
  readonly prompt: string
  readonly a: string
  readonly b: string
}

export interface Pwrm {
  /** The backbone with the score head as its LM head: its logits are scores, [B, T, 1]. */
  readonly scorer: Model.Model
  readonly tokenizer: Tokenizer.Tokenizer
  /** Most tokens of a rendered pair; longer pairs are truncated (see `encode`). */
  readonly seq: number
  readonly temperature: number
}

export const headFile = "pwrm-head.safetensors"
export const cardFile = "pwrm.json"
const headTensor = "score.weight"

/** What `load` needs of pwrm.json; the training stage writes metrics and provenance beside it. */
export const Card = Schema.Struct({
  format: Schema.Literal("cascade-pwrm/1"),
  seq: Schema.Int,
  temperature: Schema.Number
})

/** `backbone` scoring with `head` ([1, D]) in place of its LM head. */
export const scorer = (backbone: Model.Model, head: tf.Tensor2D): Model.Model =>
  // Untied, so that the head is a weight of its own (`lm_head.weight`) for Training.trainable.
  Model.make({ ...backbone.config, tieWordEmbeddings: false }, { ...backbone.weights, lmHead: [head] })

/** The score head of a scorer. */
export const head = (scorer: Model.Model): tf.Tensor2D => scorer.weights.lmHead![0]

/** A scorer's backbone with `base`'s LM head back, to save as an ordinary checkpoint of `base`'s shape. */
export const backbone = (scorer: Model.Model, base: Model.Model): Model.Model =>
  Model.make(base.config, { ...scorer.weights, lmHead: base.weights.lmHead })

// ---------------------------------------------------------------------------------------------
// Input

const separators = { a: "\n[A] ", b: "\n[B] ", end: "\nBetter:" }

/**
 * How many tokens each part keeps of `budget`: every part up to a common level, the highest that
 * fits. A part's share depends only on its own length and the level, so swapping A and B swaps
 * their shares exactly.
 */
const shares = (lengths: ReadonlyArray<number>, budget: number): Array<number> => {
  const keptAt = (level: number) => lengths.reduce((sum, n) => sum + Math.min(n, level), 0)
  let level = 0
  while (level < Math.max(...lengths) && keptAt(level + 1) <= budget) level++
  return lengths.map((n) => Math.min(n, level))
}

/**
 * The token ids of a pair, at most `seq`. When too long, the prompt keeps its end (the question
 * just before the responses) and each response its beginning.
 */
export const encode = (tokenizer: Tokenizer.Tokenizer, seq: number, pair: Pair): Array<number> => {
  const text = (s: string) => tokenizer.encode(s, { addSpecialTokens: false })
  const [prompt, a, b] = [pair.prompt, splitThinking(pair.a).answer, splitThinking(pair.b).answer].map(text)
  const [sepA, sepB, end] = [separators.a, separators.b, separators.end].map(text)
  const bos = tokenizer.bosId === undefined ? [] : [tokenizer.bosId]
  const fixed = bos.length + sepA.length + sepB.length + end.length
  const [keepPrompt, keepA, keepB] = shares([prompt.length, a.length, b.length], seq - fixed)
  return [
    ...bos,
    ...prompt.slice(prompt.length - keepPrompt),
    ...sepA,
    ...a.slice(0, keepA),
    ...sepB,
    ...b.slice(0, keepB),
    ...end
  ]
}

/** Tokens a pair takes besides its prompt and responses: `seq` must leave room for them. */
export const overhead = (tokenizer: Tokenizer.Tokenizer): number => encode(tokenizer, 0, { prompt: "", a: "", b: "" }).length

/**
 * z for each row of token ids: the score at the row's last token, [R]. Rows are padded on the right,
 * so that every row's positions start at 0 and no real token sees padding. The last token is picked
 * by a one-hot product, whose gradient every backend has (a gather's needs UnsortedSegmentSum,
 * which wasm lacks). Differentiable; the caller owns the result.
 */
export const logits = (scorer: Model.Model, rows: ReadonlyArray<ReadonlyArray<number>>, padId: number): tf.Tensor1D =>
  tf.tidy(() => {
    const t = Math.max(...rows.map((row) => row.length))
    const ids = rows.map((row) => [...row, ...new Array<number>(t - row.length).fill(padId)])
    const attentionMask = rows.map((row) => Array.from({ length: t }, (_, i) => (i < row.length ? 1 : 0)))
    const last = tf.tensor2d(rows.flatMap((row) => Array.from({ length: t }, (_, i) => (i === row.length - 1 ? 1 : 0))), [rows.length, t])
    const scores = Model.forward(scorer, ids, { attentionMask }).logits.reshape([rows.length, t])
    return tf.sum(tf.mul(scores, last), 1)
  })

/** The pad id of a tokenizer, or 0: padded positions are masked, so any id does. */
export const padId = (tokenizer: Tokenizer.Tokenizer) => tokenizer.padId ?? 0

/** z(A, B) and z(B, A) of a pair. */
export interface Scores {
  readonly ab: number
  readonly ba: number
}

/**
 * The scores of `pairs`, `batch` pairs (2 * batch rows) per forward pass. Each pair runs as the same
 * two rows in the same order whichever way round it is asked (the responses sorted), so that the
 * scores of (A, B) are exactly those of (B, A) swapped.
 */
export const scores = async (
  scorer: Model.Model,
  tokenizer: Tokenizer.Tokenizer,
  seq: number,
  pairs: ReadonlyArray<Pair>,
  batch = 16
): Promise<Array<Scores>> => {
  const out: Array<Scores> = []
  for (let start = 0; start < pairs.length; start += batch) {
    const group = pairs.slice(start, start + batch)
    const rows = group.flatMap(({ prompt, a, b }) => {
      const [first, second] = a <= b ? [a, b] : [b, a]
      return [encode(tokenizer, seq, { prompt, a: first, b: second }), encode(tokenizer, seq, { prompt, a: second, b: first })]
    })
    const z = logits(scorer, rows, padId(tokenizer))
    const values = await z.data().finally(() => z.dispose())
    group.forEach(({ a, b }, i) => {
      const [first, second] = [values[2 * i], values[2 * i + 1]]
      out.push(a <= b ? { ab: first, ba: second } : { ab: second, ba: first })
    })
  }
  return out
}

// ---------------------------------------------------------------------------------------------
// Probabilities and calibration

const sigmoid = (x: number) => 1 / (1 + Math.exp(-x))

/** log sigmoid(x), finite for any x. */
const logSigmoid = (x: number) => (x >= 0 ? -Math.log1p(Math.exp(-x)) : x - Math.log1p(Math.exp(x)))

/**
 * P(A beats B) at temperature `tau`. Computed as 1/2 + (sigmoid(ab/tau) - sigmoid(ba/tau)) / 2
 * (the formula above, rearranged) from the larger score's side, so that swapping A and B gives
 * exactly 1 - P: P(A, B) + P(B, A) is 1 in floating point, not merely close.
 */
export const preference = ({ ab, ba }: Scores, tau: number): number =>
  ab < ba ? 1 - preference({ ab: ba, ba: ab }, tau) : 0.5 + (sigmoid(ab / tau) - sigmoid(ba / tau)) / 2

/** log P(A beats B) = log((sigmoid(ab/tau) + sigmoid(-ba/tau)) / 2), finite however confident the scores. */
const logPreference = ({ ab, ba }: Scores, tau: number): number => {
  const [u, v] = [logSigmoid(ab / tau), logSigmoid(-ba / tau)]
  const top = Math.max(u, v)
  return top + Math.log((Math.exp(u - top) + Math.exp(v - top)) / 2)
}

/** A held-out pair's scores and its label. */
export interface Judged extends Scores {
  readonly aWins: boolean
}

export interface Calibration {
  /** Mean negative log-likelihood of the labels, nats per pair. */
  readonly nll: number
  /**
   * Expected calibration error: the confidence max(P, 1 - P) of each pair in 10 equal bins over
   * [0.5, 1]; the pair-weighted mean over bins of |mean confidence - accuracy|.
   */
  readonly ece: number
  /** Share of pairs whose more likely response won; a tie (P = 1/2) counts a half. */
  readonly accuracy: number
}

const bins = 10

export const calibration = (judged: ReadonlyArray<Judged>, tau: number): Calibration => {
  const confidence = new Array<number>(bins).fill(0)
  const correct = new Array<number>(bins).fill(0)
  let nll = 0
  for (const pair of judged) {
    const p = preference(pair, tau)
    nll -= pair.aWins ? logPreference(pair, tau) : logPreference({ ab: pair.ba, ba: pair.ab }, tau)
    const c = Math.max(p, 1 - p)
    const bin = Math.min(bins - 1, Math.floor(((c - 0.5) / 0.5) * bins))
    confidence[bin] += c
    correct[bin] += p === 0.5 ? 0.5 : (p > 0.5) === pair.aWins ? 1 : 0
  }
  const n = Math.max(judged.length, 1)
  return {
    nll: nll / n,
    // sum over bins of (pairs in bin / n) |mean confidence - accuracy| = |sum confidence - sum correct| / n
    ece: confidence.reduce((sum, c, i) => sum + Math.abs(c - correct[i]), 0) / n,
    accuracy: correct.reduce((sum, k) => sum + k, 0) / n
  }
}

/**
 * The temperature that minimises the held-out NLL: the best of a grid over [0.001, 1000] (log scale)
 * refined by golden-section search between its neighbours. 1 when nothing beats it, so fitting never
 * makes the NLL on these pairs worse.
 */
export const fitTemperature = (judged: ReadonlyArray<Judged>): number => {
  const nllAt = (logTau: number) => calibration(judged, Math.exp(logTau)).nll
  const [low, high, step] = [Math.log(1e-3), Math.log(1e3), 0.1]
  const grid = Array.from({ length: Math.floor((high - low) / step) + 1 }, (_, i) => low + i * step)
  const values = grid.map(nllAt)
  const best = grid[values.indexOf(Math.min(...values))]
  let [a, b] = [best - step, best + step]
  const ratio = (Math.sqrt(5) - 1) / 2
  while (b - a > 1e-6) {
    const [c, d] = [b - ratio * (b - a), a + ratio * (b - a)]
    if (nllAt(c) < nllAt(d)) b = d
    else a = c
  }
  const fitted = (a + b) / 2
  return nllAt(fitted) < nllAt(0) ? Math.exp(fitted) : 1
}

// ---------------------------------------------------------------------------------------------
// Folders

/** Writes the score head of `scorer` to DIR/pwrm-head.safetensors. */
export const saveHead = (dir: string, scorer: Model.Model) => {
  const weight = head(scorer)
  return Safetensors.write(path.join(dir, headFile), [
    { name: headTensor, dtype: "F32", shape: weight.shape, data: Effect.promise(() => weight.data() as Promise<Float32Array>) }
  ])
}

/** The score head of DIR, [1, hiddenSize]; released with the scope. */
export const loadHead = Effect.fn("Pwrm.loadHead")(function*(dir: string, hiddenSize: number) {
  const file = path.join(dir, headFile)
  const values = yield* Effect.scoped(Effect.gen(function*() {
    const opened = yield* Safetensors.open(file)
    const { shape } = yield* opened.info(headTensor)
    if (shape.length !== 2 || shape[0] !== 1 || shape[1] !== hiddenSize) {
      return yield* new CheckpointError({ file, tensor: headTensor, reason: `has shape [${shape}], the backbone needs [1,${hiddenSize}]` })
    }
    return yield* opened.readFloat32(headTensor)
  }))
  return yield* Effect.acquireRelease(
    Effect.sync(() => tf.tensor2d(values, [1, hiddenSize])),
    (tensor) => Effect.sync(() => tensor.dispose())
  )
})

/** Loads a PWRM folder; its tensors are released with the scope. */
export const load = Effect.fn("Pwrm.load")(function*(dir: string) {
  const cardPath = path.join(dir, cardFile)
  const json = yield* Files.readJsonIfPresent(cardPath)
  if (json === undefined) return yield* new CheckpointError({ file: cardPath, reason: "not found: is this a folder `cascade pwrm train` wrote?" })
  const card = yield* Schema.decodeUnknownEffect(Card)(json).pipe(
    Effect.mapError((error) => new CheckpointError({ file: cardPath, reason: error.message }))
  )
  const backbone = yield* Pretrained.load(dir)
  // The base's LM head is never used here: freed now, not with the scope (disposing twice is harmless).
  tf.dispose([...backbone.weights.lmHead ?? []])
  const weight = yield* loadHead(dir, backbone.config.hiddenSize)
  return {
    scorer: scorer(backbone, weight),
    tokenizer: yield* Tokenizer.load(dir),
    seq: card.seq,
    temperature: card.temperature
  } satisfies Pwrm
})

/** P(A beats B) for each pair, symmetrised and at the model's temperature. */
export const probabilities = async (pwrm: Pwrm, pairs: ReadonlyArray<Pair>): Promise<Array<number>> =>
  (await scores(pwrm.scorer, pwrm.tokenizer, pwrm.seq, pairs)).map((s) => preference(s, pwrm.temperature))

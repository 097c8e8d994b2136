/**
 * Continuous batching for the server: every sample of every request in flight is a row of one
 * batch, decoded a token per step over one KV cache. Prompts that arrive while others decode are
 * run together in one pass (their prefill), their cache is copied once per sample, and their rows
 * join the batch at the next step; rows leave as they finish, time out, or as their client goes away.
 *
 * Rows are left-padded to the longest in the cache, and each row is given its own positions
 * (`positionIds`), so a row's logits are those it gets alone up to float rounding, whatever it
 * is batched with. Sampling happens on the device (temperature, top-p, a uniform per row drawn from
 * the row's own seeded stream), so a decode step reads back one small tensor for the whole batch:
 * per row the token, its log-prob and rank and the top k alternatives. No synchronous read is made
 * (tfjs-webgpu in Node cannot read synchronously).
 *
 * Tensors belong to the batch loop: whatever a step leaves (a failure, an interruption) is freed,
 * and a row that leaves frees its part of the cache at the next step.
 */
import * as tf from "@tensorflow/tfjs"
import { Cause, Effect, Latch, Queue, Schema, type Scope, Stream } from "effect"
import * as Generate from "../model/Generate.ts"
import * as Model from "../model/Model.ts"
import * as Random from "../Random.ts"

/** The queue of requests waiting for a place in the batch is full. */
export class QueueFull extends Schema.TaggedError<QueueFull>()("QueueFull", { waiting: Schema.Number }) {}

/** The request was not finished within its time limit. */
export class TimedOut extends Schema.TaggedError<TimedOut>()("TimedOut", { seconds: Schema.Number }) {}

/** Generate's options for one request; all its rows share them. */
export type Options = Omit<Generate.Options, "batchSize" | "loop">

export interface Limits {
  /** Rows decoded together at most (a prompt's samples join together: one with more samples joins an empty batch). */
  readonly maxBatch: number
  /** Requests waiting for a place in the batch at most; more are refused with QueueFull. */
  readonly maxQueue: number
  /** Seconds from submission after which a request fails with TimedOut. */
  readonly timeoutSeconds: number
}

/** One sample's progress: a token it sampled, and on its last step how it ended. */
export interface Step {
  /** Which prompt of the request, and which of its samples. */
  readonly prompt: number
  readonly sample: number
  /** The token sampled at this step; undefined for a request of no new tokens. */
  readonly token: Generate.TokenLogprob | undefined
  /** The tokens sampled so far. */
  readonly tokens: ReadonlyArray<number>
  /** On the sample's first step, with `promptLogprobs`: the prompt's scores (the first token has none). */
  readonly promptLogprobs: ReadonlyArray<Generate.TokenLogprob | undefined> | undefined
  /** On the sample's last step: the whole generation. */
  readonly generation: Generate.Generation | undefined
}

export interface Batcher {
  /**
   * Queues `n` samples of each prompt; the stream gives their steps as they are decoded and ends
   * when all have finished. The request holds its place until the scope closes, which drops its
   * rows (a client that went away). Fails at once with QueueFull when the queue is full.
   */
  readonly submit: (
    prompts: ReadonlyArray<ReadonlyArray<number>>,
    n: number,
    options: Options,
    images?: ReadonlyArray<PromptImages | undefined>
  ) => Effect.Effect<Stream.Stream<Step, TimedOut>, QueueFull, Scope.Scope>
}

/** A prompt's image features for a Mistral 3 model, a row per image token of the prompt; the submitter's to dispose after its scope. */
export type PromptImages = NonNullable<Model.ForwardOptions["imageFeatures"]>

interface Request {
  readonly prompts: ReadonlyArray<ReadonlyArray<number>>
  /** The batcher's own copies of the prompts' image features, each freed once its prompt is prefilled or the request leaves. */
  readonly images: ReadonlyArray<PromptImages | undefined> | undefined
  readonly n: number
  readonly options: Options
  readonly seed: number
  readonly deadline: number
  readonly steps: Queue.Queue<Step, TimedOut | Cause.Done>
  /** Prompts prefilled so far. */
  admitted: number
  /** Samples not finished yet. */
  unfinished: number
  /** Its client went away or it timed out: its rows leave at the next step. */
  cancelled: boolean
}

/** One prompt of a request, let into the batch. */
interface Admission {
  readonly request: Request
  readonly prompt: number
}

/** Padded prompt tokens one prefill pass takes at most (a longer prompt runs alone). */
const PREFILL_TOKENS = 2048

/** A row of the batch: one sample of one prompt of a request. */
interface Sequence {
  readonly request: Request
  readonly prompt: number
  readonly sample: number
  readonly row: Generate.Row
}

/** Starts the batch loop, which runs until the scope closes. */
export const make = Effect.fn("Batcher.make")(function*(model: Model.Model, limits: Limits) {
  const waiting: Array<Request> = []
  const wake = yield* Latch.make(false)
  let rows: Array<Sequence> = []
  let cache: Model.KVCache | undefined
  /** [rows, V]: each row's next-token log-probabilities. */
  let logProbs: tf.Tensor2D | undefined
  /** Tensors held across a read, freed by whatever ends the step. */
  const live = new Set<tf.Tensor>()
  const hold = <T extends tf.Tensor>(tensor: T): T => (live.add(tensor), tensor)
  const release = (tensors: ReadonlyArray<tf.Tensor>) => {
    for (const tensor of tensors) {
      tensor.dispose()
      live.delete(tensor)
    }
  }

  const disposeBatch = () => {
    tf.dispose([...live])
    live.clear()
    if (cache) Model.disposeCache(cache)
    logProbs?.dispose()
    cache = undefined
    logProbs = undefined
    rows = []
  }

  const emit = (sequence: Sequence, token: Generate.TokenLogprob | undefined) => {
    const { request, row } = sequence
    const done = row.finishReason !== undefined || token === undefined
    Queue.offerUnsafe(request.steps, {
      prompt: sequence.prompt,
      sample: sequence.sample,
      token,
      tokens: [...row.tokens],
      promptLogprobs: row.tokens.length <= 1 ? row.promptLogprobs : undefined,
      generation: done ? Generate.finish(row, request.options) : undefined
    })
    if (done && --request.unfinished === 0) Queue.endUnsafe(request.steps)
  }

  /** Frees the image features of the request's prompts from `from` on (those not prefilled yet, by default). */
  const dropImages = (request: Request, from = request.admitted) => {
    for (let prompt = from; prompt < request.prompts.length; prompt++) request.images?.[prompt]?.features.dispose()
  }

  const end = (request: Request, cause: Cause.Cause<TimedOut>) => {
    request.cancelled = true
    Queue.failCauseUnsafe(request.steps, cause)
  }

  /** Keeps the rows `keep` of the batch, dropping the cache's columns that are padding in all of them. */
  const keepRows = (keep: ReadonlyArray<Sequence>) => {
    if (keep.length === rows.length) return
    const old = cache
    const indices = keep.map((sequence) => rows.indexOf(sequence))
    rows = [...keep]
    if (old === undefined) return
    if (indices.length === 0) {
      Model.disposeCache(old)
      cache = undefined
      return
    }
    const drop = Math.min(...indices.map((i) => old.keyMask[i].indexOf(1)))
    const layers = tf.tidy(() => {
      const picked = tf.tensor1d(indices, "int32")
      const select = (x: tf.Tensor4D) => tf.gather(x, picked, 0).slice([0, 0, drop, 0], [-1, -1, -1, -1]) as tf.Tensor4D
      return old.layers.map(({ k, v }) => ({ k: select(k), v: select(v) }))
    })
    Model.disposeCache(old)
    cache = { layers, keyMask: indices.map((i) => old.keyMask[i].slice(drop)), length: old.length - drop }
  }

  /** Appends rows with their cache and next-token log-probs, left-padding the shorter cache. */
  const join = (sequences: ReadonlyArray<Sequence>, joining: Model.KVCache, next: tf.Tensor2D) => {
    const old = cache
    const length = Math.max(old?.length ?? 0, joining.length)
    const padded = (c: Model.KVCache) => (x: tf.Tensor4D) =>
      c.length === length ? x : tf.pad(x, [[0, 0], [0, 0], [length - c.length, 0], [0, 0]])
    const maskOf = (c: Model.KVCache) => c.keyMask.map((mask) => {
      const out = new Uint8Array(length)
      out.set(mask, length - c.length)
      return out
    })
    if (old === undefined) {
      cache = joining
      logProbs = next
    } else {
      // One tidy: a failure anywhere in the merge leaves none of its tensors behind.
      const { layers, merged } = tf.tidy(() => ({
        layers: old.layers.map((layer, i) => ({
          k: tf.concat([padded(old)(layer.k), padded(joining)(joining.layers[i].k)], 0),
          v: tf.concat([padded(old)(layer.v), padded(joining)(joining.layers[i].v)], 0)
        })),
        merged: tf.concat([logProbs!, next], 0)
      }))
      Model.disposeCache(old)
      Model.disposeCache(joining)
      tf.dispose([logProbs!, next])
      cache = { layers, keyMask: [...maskOf(old), ...maskOf(joining)], length }
      logProbs = merged
    }
    rows.push(...sequences)
  }

  /**
   * Runs the prompts of a group of arrivals in one pass, left-padded, each at its own positions, and
   * puts their samples in the batch; samples of requests asking for no token finish at once.
   */
  const prefill = Effect.fnUntraced(function*(group: ReadonlyArray<Admission>) {
    const entries = group.map(({ request, prompt }) => {
      const ids = request.prompts[prompt]
      const sequences = Array.from({ length: request.n }, (_, sample): Sequence => ({
        request,
        prompt,
        sample,
        row: Generate.newRow(ids, Random.uniform(Generate.mixSeed(request.seed, prompt * request.n + sample)))
      }))
      return { ids, sequences, decodes: request.options.maxNewTokens > 0, k: request.options.promptLogprobs, images: request.images?.[prompt] }
    })
    const run = entries.filter((entry) => entry.decodes || entry.k !== undefined)
    if (run.length > 0) {
      const width = Math.max(...run.map(({ ids }) => ids.length))
      const padding = run.map(({ ids }) => width - ids.length)
      const ids = run.map((entry, i) => [...new Array<number>(padding[i]).fill(0), ...entry.ids])
      const targets = ids.flatMap((row) => row.slice(1))
      const k = Math.max(-1, ...run.map((entry) => entry.k ?? -1))
      // Each joining sample names the row of the pass it continues.
      const joining = run.flatMap((entry, i) => (entry.decodes ? entry.sequences.map((sequence) => ({ sequence, from: i })) : []))
      const seeing = run.flatMap((entry) => (entry.images === undefined ? [] : [entry.images]))
      const scores = yield* Effect.sync(() => {
        const features = seeing.length === 0 ? undefined : hold(seeing.length === 1 ? seeing[0].features.clone() : tf.concat(seeing.map((images) => images.features), 0) as tf.Tensor2D)
        const out = Model.forward(model, ids, {
          imageFeatures: features && { features, tokenId: seeing[0].tokenId },
          attentionMask: padding.map((pad) => Array.from({ length: width }, (_, j) => (j < pad ? 0 : 1))),
          positionIds: padding.map((pad) => Array.from({ length: width }, (_, j) => Math.max(0, j - pad))),
          useCache: joining.length > 0,
          // Without prompt scores only the last position's logits are needed: a long prompt's whole
          // [width, V] logits may not fit (one storage binding on a GPU, or memory).
          lastLogitsOnly: k < 0
        })
        if (features !== undefined) release([features])
        const logits = hold(out.logits)
        // The pass's keys and values are held too: a failure while scoring or picking frees them.
        const passTensors = out.cache?.layers.flatMap(({ k, v }) => [k, v]).map(hold) ?? []
        const scored = k < 0 || width === 1 ? undefined : Generate.scorePrompt(logits, targets, k).map(hold)
        if (out.cache) {
          const passCache = out.cache
          const [layers, next] = tf.tidy(() => {
            const from = tf.tensor1d(joining.map(({ from }) => from), "int32")
            const pick = <T extends tf.Tensor>(x: T) => tf.gather(x, from, 0) as T
            return [passCache.layers.map(({ k, v }) => ({ k: pick(k), v: pick(v) })), pick(Generate.lastLogProbs(logits))] as const
          })
          release(passTensors)
          // Held until the batch owns them, so that a failure to join (out of memory) frees them.
          const joiningTensors = [...layers.flatMap(({ k, v }) => [k, v]), next].map(hold)
          const keyMask = joining.map(({ from }) => passCache.keyMask[from])
          join(joining.map(({ sequence }) => sequence), { layers, keyMask, length: passCache.length }, next)
          for (const tensor of joiningTensors) live.delete(tensor)
        }
        release([logits])
        return scored
      })
      if (scores) {
        const values = yield* Effect.promise(() => Promise.all(scores.map((tensor) => tensor.data())))
        release(scores)
        const parsed = Generate.parseScores(values, targets)
        run.forEach((entry, i) => {
          if (entry.k === undefined) return
          // Token j >= 1 of row i is predicted at padded position padding[i] + j - 1.
          const offset = i * (width - 1) + padding[i] - 1
          const own = entry.ids.map((_, j) => (j === 0 ? undefined : { ...parsed[offset + j], top: parsed[offset + j].top.slice(0, entry.k) }))
          for (const { row } of entry.sequences) row.promptLogprobs = own
        })
      } else if (k >= 0) {
        // One-token prompts have nothing to score.
        for (const entry of run) for (const { row } of entry.sequences) if (entry.k !== undefined) row.promptLogprobs = [undefined]
      }
    }
    for (const entry of entries) if (!entry.decodes) for (const sequence of entry.sequences) emit(sequence, undefined)
  })

  /** Samples a token for every row, reads them back at once, advances the rows and decodes the next position. */
  const decode = Effect.fnUntraced(function*() {
    const batch = rows
    const k = Math.max(...batch.map(({ request }) => request.options.topLogprobs ?? 0))
    const packed = yield* Effect.sync(() => {
      const out = hold(sampleAndScore(logProbs!, batch, k))
      logProbs!.dispose()
      logProbs = undefined
      return out
    })
    const values = (yield* Effect.promise(() => packed.data())) as Float32Array
    release([packed])
    batch.forEach((sequence, i) => {
      if (sequence.request.cancelled) return
      const token = unpack(values, i, k, sequence.request.options.topLogprobs ?? 0)
      Generate.advance(sequence.row, token, sequence.request.options)
      emit(sequence, token)
    })
    yield* Effect.sync(() => {
      keepRows(batch.filter(({ row, request }) => row.finishReason === undefined && !request.cancelled))
      if (rows.length === 0) return
      const out = Model.forward(model, rows.map(({ row }) => [row.tokens[row.tokens.length - 1]]), {
        cache,
        useCache: true,
        positionIds: rows.map(({ row }) => [row.prompt.length + row.tokens.length - 1])
      })
      cache = out.cache
      const logits = hold(out.logits)
      logProbs = Generate.lastLogProbs(logits)
      release([logits])
    })
  })

  /** Ends requests past their deadline and drops rows whose request was cancelled. */
  const expire = () => {
    const now = Date.now()
    for (const request of new Set([...waiting, ...rows.map(({ request }) => request)])) {
      if (!request.cancelled && now >= request.deadline) end(request, Cause.fail(new TimedOut({ seconds: limits.timeoutSeconds })))
    }
    for (let i = waiting.length - 1; i >= 0; i--) if (waiting[i].cancelled) dropImages(waiting.splice(i, 1)[0])
    if (rows.some(({ request }) => request.cancelled)) {
      const kept = rows.filter(({ request }) => !request.cancelled)
      const indices = kept.map((sequence) => rows.indexOf(sequence))
      // The next-token log-probs follow the rows.
      const next = indices.length === 0 ? undefined : tf.tidy(() => tf.gather(logProbs!, tf.tensor1d(indices, "int32"), 0) as tf.Tensor2D)
      logProbs?.dispose()
      logProbs = next
      keepRows(kept)
    }
  }

  const step = Effect.gen(function*() {
    yield* Effect.sync(expire)
    // Arrivals join in one prefill pass while the batch has room for all their samples and the
    // pass's padded prompts stay within PREFILL_TOKENS (its logits are [prompts, longest, V]).
    const group: Array<Admission> = []
    let joined = rows.length
    let longest = 0
    while (waiting.length > 0) {
      const request = waiting[0]
      if (request.cancelled) {
        dropImages(waiting.shift()!)
        continue
      }
      const width = Math.max(longest, request.prompts[request.admitted].length)
      const fits = (joined === 0 || joined + request.n <= limits.maxBatch) && (group.length === 0 || (group.length + 1) * width <= PREFILL_TOKENS)
      if (!fits) break
      group.push({ request, prompt: request.admitted++ })
      if (request.admitted === request.prompts.length) waiting.shift()
      joined += request.n
      longest = width
    }
    if (group.length > 0) {
      yield* prefill(group).pipe(
        Effect.ensuring(Effect.sync(() => group.forEach(({ request, prompt }) => dropImages(request, prompt)))),
        // The failure is these requests': they are told, the pass's temporaries freed, and the batch goes on.
        Effect.catchDefect((defect) =>
          Effect.sync(() => {
            release([...live])
            for (const { request } of group) end(request, Cause.die(defect))
          })
        )
      )
    }
    if (rows.length === 0) return
    // Reading tensors back settles in microtasks: yield so that I/O, timers and interruption get a turn.
    yield* Effect.yieldNow
    yield* decode()
  })

  const failBatch = (defect: unknown) =>
    Effect.sync(() => {
      for (const request of new Set(rows.map(({ request }) => request))) end(request, Cause.die(defect))
      disposeBatch()
    })

  yield* Effect.gen(function*() {
    while (true) {
      if (rows.length === 0 && waiting.length === 0) {
        yield* wake.close
        yield* wake.await
      }
      yield* step.pipe(Effect.catchDefect(failBatch))
    }
  }).pipe(
    Effect.ensuring(Effect.sync(() => {
      disposeBatch()
      for (const request of waiting) dropImages(request)
    })),
    Effect.forkScoped
  )

  const submit = (prompts: ReadonlyArray<ReadonlyArray<number>>, n: number, options: Options, images?: ReadonlyArray<PromptImages | undefined>) =>
    Effect.gen(function*() {
      if (waiting.length >= limits.maxQueue) return yield* new QueueFull({ waiting: waiting.length })
      const steps = yield* Queue.unbounded<Step, TimedOut | Cause.Done>()
      const request: Request = {
        prompts,
        // Copies the batch owns: the submitter's may be freed when its client leaves, while a pass reads them.
        images: images?.map((image) => image && { features: image.features.clone(), tokenId: image.tokenId }),
        n,
        options,
        seed: options.seed ?? Math.floor(Math.random() * 2 ** 32),
        deadline: Date.now() + limits.timeoutSeconds * 1000,
        steps,
        admitted: 0,
        unfinished: prompts.length * n,
        cancelled: false
      }
      yield* Effect.acquireRelease(
        Effect.sync(() => {
          waiting.push(request)
          wake.openUnsafe()
        }),
        () => Effect.sync(() => (request.cancelled = true))
      )
      return Stream.fromQueue(steps)
    })

  return { submit } satisfies Batcher
})

/**
 * Per row [token, log-prob, rank, top k log-probs, top k ids] as one float32 tensor [R, 3 + 2k]
 * (ids below 2^24 are exact), from the rows' next-token log-probs.
 */
const sampleAndScore = (logProbs: tf.Tensor2D, rows: ReadonlyArray<Sequence>, k: number): tf.Tensor2D =>
  tf.tidy(() => {
    const r = rows.length
    const temperatures = rows.map(({ request }) => request.options.temperature ?? 1)
    const tokens = sample(
      logProbs,
      temperatures,
      rows.map(({ request }) => request.options.topP ?? 1),
      rows.map(({ row }, i) => (temperatures[i] === 0 ? 0 : row.random()))
    )
    const [chosen, rank, topValues, topIds] = Generate.score(logProbs, tokens, k)
    const columns = [tokens, chosen, rank].map((column) => tf.cast(column, "float32").reshape([r, 1]))
    return tf.concat(k === 0 ? columns : [...columns, topValues, tf.cast(topIds, "float32")], 1) as tf.Tensor2D
  })

/**
 * Draws a token per row on the device: greedy at temperature 0, else the first candidate whose
 * cumulative probability at the row's temperature passes `uniform` times the total, over the
 * vocabulary, or with top-p over the smallest set of most likely tokens whose mass reaches it.
 */
const sample = (
  logProbs: tf.Tensor2D,
  temperatures: ReadonlyArray<number>,
  topPs: ReadonlyArray<number>,
  uniforms: ReadonlyArray<number>
): tf.Tensor1D => {
  const [r, v] = logProbs.shape
  const greedy = tf.argMax(logProbs, 1) as tf.Tensor1D
  if (temperatures.every((temperature) => temperature === 0)) return greedy
  const probabilities = tf.softmax(tf.div(logProbs, tf.tensor2d(temperatures.map((t) => (t === 0 ? 1 : t)), [r, 1])))
  const sorted = topPs.some((topP) => topP < 1) ? tf.topk(probabilities, v) : undefined
  // A candidate is in the nucleus when the mass of those more likely is below top-p.
  const weights = sorted
    ? tf.where(tf.less(tf.sub(tf.cumsum(sorted.values, 1), sorted.values), tf.tensor2d([...topPs], [r, 1])), sorted.values, tf.zerosLike(sorted.values))
    : probabilities
  const cumulative = tf.cumsum(weights, 1)
  const threshold = tf.mul(tf.tensor2d([...uniforms], [r, 1]), cumulative.slice([0, v - 1], [r, 1]))
  // The last candidate still adding mass: a uniform that rounds to 1 must not reach the flat tail
  // of ids whose probability is (close to) zero.
  const lastCandidate = tf.sum(tf.cast(tf.less(cumulative, cumulative.slice([0, v - 1], [r, 1])), "int32"), 1)
  // Clamped to the last candidate, for a threshold that rounding put at the total. (All int32: a
  // float32 operand would make the result float32, which tf.where then reads as int32 on wasm.)
  const position = tf.minimum(tf.sum(tf.cast(tf.lessEqual(cumulative, threshold), "int32"), 1), lastCandidate) as tf.Tensor1D
  const drawn = sorted ? tf.gatherND(sorted.indices, tf.stack([tf.range(0, r, 1, "int32"), position], 1)) as tf.Tensor1D : position
  return tf.where(tf.tensor1d(temperatures.map((t) => t === 0), "bool"), greedy, drawn)
}

/** Row i of sampleAndScore's output, keeping the row's own `top` alternatives of the batch's k. */
const unpack = (values: Float32Array, i: number, k: number, top: number): Generate.TokenLogprob => {
  const at = i * (3 + 2 * k)
  return {
    token: values[at],
    logprob: values[at + 1],
    rank: values[at + 2],
    top: Array.from({ length: top }, (_, j) => ({ token: values[at + 3 + k + j], logprob: values[at + 3 + j] }))
  }
}

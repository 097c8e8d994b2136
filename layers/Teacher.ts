/**
 * The three sources of teacher log-probabilities, as layers of the `Teacher` service (src/train/Teacher.ts):
 *
 * - `inProcess(dir)`: a checkpoint run here with `Model.forward`; full log-probs or their top-k.
 * - `offlineCache(dir, ...)`: the top-k that `cascade teacher-cache` wrote (src/io/TeacherCacheFormat.ts),
 *   looked up by packed-row index; made from whole rows, it refuses document-masked batches.
 * - `remote(urls, ...)`: an OpenAI-compatible server as vLLM serves it, through `prompt_logprobs`.
 *
 * They give the same numbers for the same rows, up to the cache's float16 rounding and the server's
 * own arithmetic, so a run can change source without changing its loss. Each pulls a bounded number
 * of batches ahead of its consumer.
 */
import * as tf from "@tensorflow/tfjs"
import { Channel, Duration, Effect, Layer, Schedule, Schema, Stream } from "effect"
import { FetchHttpClient, HttpClient, HttpClientRequest } from "effect/http"
import * as Checkpoint from "../src/io/Checkpoint.ts"
import * as Dataset from "../src/data/Dataset.ts"
import * as Files from "../src/io/Files.ts"
import * as Model from "../src/model/Model.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Vision from "../src/model/Vision.ts"
import * as TeacherCacheFormat from "../src/io/TeacherCacheFormat.ts"
import { type Annotated, type Batch, type Output, Teacher, TeacherError } from "../src/train/Teacher.ts"
import { TensorBackend } from "./TensorBackend.ts"

const describeBatch = (batch: Batch) =>
  batch.indices.length === 0 ? "an empty batch" : `rows ${batch.indices[0]}..${batch.indices[batch.indices.length - 1]}`

/**
 * Lets a stream run up to `n` elements ahead of its consumer: a producer fills a queue of n - 1
 * while holding one more. Not `Stream.buffer`, whose consumer takes everything queued at once, so
 * that up to 2n elements are pulled before the consumer is done with the first.
 */
const lookAhead = (n: number) => <A, E, R>(stream: Stream.Stream<A, E, R>): Stream.Stream<A, E, R> =>
  n === 0 ? stream : Stream.fromChannel(Channel.buffer(stream.channel, { capacity: n - 1 }))

const positiveInteger = (value: number) => Number.isInteger(value) && value >= 1

// ---------------------------------------------------------------------------------------------
// In process

export interface InProcessOptions {
  /** Give the top-k ids and log-probabilities instead of the full distribution. */
  readonly topK?: number | undefined
  /** Batches computed ahead of the consumer (default 1; 0 computes each when it is asked for). */
  readonly batchAhead?: number | undefined
}

/** A checkpoint folder run in this process; its tensors are released with the layer. */
export const inProcess = (dir: string, options: InProcessOptions = {}) =>
  Layer.effect(
    Teacher,
    Effect.gen(function*() {
      yield* TensorBackend // the model's tensors live on it
      const model = yield* Pretrained.load(dir)
      const vision = yield* Vision.loadIfPresent(dir)
      const vocab = model.config.vocabSize
      const source = `in-process ${dir} (weights ${(yield* Checkpoint.fingerprint(dir)).slice(0, 16)})`
      const { topK, batchAhead = 1 } = options
      if (topK !== undefined && !(positiveInteger(topK) && topK <= vocab)) {
        return yield* new TeacherError({ source, reason: `top-k ${topK} is not between 1 and the vocabulary size ${vocab}` })
      }
      if (!(Number.isInteger(batchAhead) && batchAhead >= 0)) {
        return yield* new TeacherError({ source, reason: `batchAhead ${batchAhead} is not a non-negative integer` })
      }
      const annotateBatch = (batch: Batch) =>
        Effect.tryPromise({
          try: () => logProbsOf(model, vision, batch, topK),
          catch: (cause) => new TeacherError({ source, request: describeBatch(batch), reason: String(cause) })
        }).pipe(Effect.map((teacher): Annotated => ({ batch, teacher })))
      return Teacher.of({
        describe: `${source}, ${topK === undefined ? "full distribution" : `top-${topK}`}`,
        vocab,
        annotate: (batches) => batches.pipe(Stream.mapEffect(annotateBatch), lookAhead(batchAhead))
      })
    })
  )

/**
 * The teacher's log-softmax (or its top-k) at every position of the rows, zero at padding; the rows'
 * images seen through the teacher's own image side.
 */
const logProbsOf = async (model: Model.Model, vision: Vision.Vision | undefined, batch: Batch, topK: number | undefined): Promise<Output> => {
  const rows = batch.rows
  const images = rows.flatMap((row) => row.images ?? [])
  if (images.length > 0 && vision === undefined) throw new Error("the rows have images but the teacher has no image side (not a Mistral 3 with its vision encoder)")
  const tensors = tf.tidy(() => {
    const imageFeatures = images.length === 0 ? undefined : { features: Vision.featuresOfImages(vision!, images).projected, tokenId: vision!.config.imageTokenId }
    const logits = Model.forward(model, rows.map((row) => row.ids), { ...Dataset.rowMasks(rows, batch.documentMask ?? false), imageFeatures }).logits
    const logProbs = tf.logSoftmax(logits)
    if (topK === undefined) return [logProbs]
    const { values, indices } = tf.topk(logProbs, topK)
    return [values, indices]
  })
  try {
    const [values, indices] = await Promise.all(tensors.map((tensor) => tensor.data()))
    const width = topK ?? model.config.vocabSize
    const t = rows.length === 0 ? 0 : rows[0].ids.length
    // Padding positions are zeroed so that every source (and the cache written from this one) agrees there.
    rows.forEach((row, r) => {
      values.fill(0, (r * t + row.length) * width, (r + 1) * t * width)
      indices?.fill(0, (r * t + row.length) * width, (r + 1) * t * width)
    })
    return topK === undefined
      ? { _tag: "Full", vocab: width, logProbs: values as Float32Array }
      : { _tag: "TopK", k: topK, ids: indices as Int32Array, logProbs: values as Float32Array }
  } finally {
    tf.dispose(tensors)
  }
}

// ---------------------------------------------------------------------------------------------
// Offline cache

export interface OfflineCacheOptions {
  /** The JSONL file the rows are packed from; its sha256 must be the cache's. */
  readonly data: string
  /** The packing length of the rows. */
  readonly seq: number
  /** sha256 of the student's tokenizer.json (`TeacherCacheFormat.tokenizerHash`), null when it has none. */
  readonly tokenizerHash: string | null
}

/** Decoded shards kept: a batch may straddle two, and rows are mostly read in order. */
const SHARDS_KEPT = 2

/**
 * The top-k a `cascade teacher-cache` run wrote to `dir`, for rows packed from the same data with
 * the same tokenizer and `seq`. Shards are read when a batch needs them, a few kept decoded.
 */
export const offlineCache = (dir: string, options: OfflineCacheOptions) =>
  Layer.effect(
    Teacher,
    Effect.gen(function*() {
      const source = `cache ${dir}`
      const fail = (reason: string, request?: string) => new TeacherError({ source, request, reason })
      const manifest = yield* TeacherCacheFormat.readManifest(dir).pipe(Effect.mapError((error) => fail(error.message)))
      if (manifest === undefined) {
        return yield* fail(`has no ${TeacherCacheFormat.manifestName}: not a teacher cache (cascade teacher-cache makes one)`)
      }
      const dataHash = yield* Files.sha256(options.data).pipe(Effect.mapError((error) => fail(error.message)))
      const name = (hash: string | null) => (hash === null ? "none" : `sha256 ${hash.slice(0, 12)}`)
      const differences = [
        manifest.data.hash === dataHash ? [] : [
          `it was made from other data (${manifest.data.path}, ${name(manifest.data.hash)}) than ${options.data} (${name(dataHash)})`
        ],
        manifest.tokenizerHash === options.tokenizerHash ? [] : [
          `it was made with another tokenizer (tokenizer.json ${name(manifest.tokenizerHash)}; this run's: ${name(options.tokenizerHash)})`
        ],
        manifest.seq === options.seq ? [] : [`it holds rows of ${manifest.seq} tokens, not ${options.seq} (--seq)`]
      ].flat()
      if (differences.length > 0) return yield* fail(`does not fit this run: ${differences.join("; ")}`)

      const { seq, topK: k, rowsPerShard } = manifest
      const shards = new Map<number, TeacherCacheFormat.Shard>() // in order of use, oldest first
      const readShard = (index: number) =>
        TeacherCacheFormat.readShard(dir, manifest, index).pipe(Effect.mapError((error) => fail(error.message)))
      const shardOf = Effect.fnUntraced(function*(index: number) {
        let shard = shards.get(index)
        if (shard === undefined) {
          shard = yield* readShard(index)
          if (shards.size === SHARDS_KEPT) shards.delete(shards.keys().next().value!)
        }
        shards.delete(index)
        shards.set(index, shard)
        return shard
      })

      const lookUp = Effect.fnUntraced(function*(batch: Batch) {
        if (batch.documentMask) {
          return yield* fail(
            "the cache holds the teacher reading whole packed rows, and this run masks documents (its teacher must read each on its own): " +
              "run with --no-document-mask, or use the teacher checkpoint or a server",
            describeBatch(batch)
          )
        }
        const ids = new Int32Array(batch.rows.length * seq * k)
        const logProbs = new Float32Array(batch.rows.length * seq * k)
        for (const [r, row] of batch.rows.entries()) {
          const index = batch.indices[r]
          const request = `row ${index}`
          if (!(Number.isInteger(index) && index >= 0 && index < manifest.rows)) {
            const held = `the cache holds rows 0..${manifest.rows - 1}${manifest.complete ? "" : " (its writing run has not finished)"}`
            return yield* fail(`row ${index} is not in the cache: ${held}`, request)
          }
          if (row.ids.length !== seq) return yield* fail(`the row has ${row.ids.length} tokens, the cache's rows ${seq}`, request)
          const shard = yield* shardOf(Math.floor(index / rowsPerShard))
          const at = index % rowsPerShard
          if (shard.lengths[at] !== row.length) {
            return yield* fail(`the row has ${row.length} real tokens, the cache's row ${shard.lengths[at]}: the data or its packing differ`, request)
          }
          ids.set(shard.ids.subarray(at * seq * k, (at + 1) * seq * k), r * seq * k)
          logProbs.set(shard.logProbs.subarray(at * seq * k, (at + 1) * seq * k), r * seq * k)
        }
        return { batch, teacher: { _tag: "TopK", k, ids, logProbs } } satisfies Annotated
      })

      return Teacher.of({
        describe: `${source} (top-${k} of ${manifest.teacher.path}, config ${manifest.teacher.configHash.slice(0, 12)})`,
        vocab: manifest.teacher.vocab,
        annotate: (batches) => batches.pipe(Stream.mapEffect(lookUp))
      })
    })
  )

// ---------------------------------------------------------------------------------------------
// Remote

export interface RemoteOptions {
  /** The `model` field of requests: the name the server serves (vLLM: --served-model-name). */
  readonly model?: string | undefined
  /** Candidates per position; vLLM caps it at --max-logprobs (default 20). */
  readonly topK: number
  /** Rows in flight at once, over all endpoints (default 8). */
  readonly concurrency?: number | undefined
  /** Further tries of a request that failed in a way that may pass (default 5). */
  readonly retries?: number | undefined
  /** Per try, for the whole answer (default 5 minutes). */
  readonly timeout?: Duration.Input | undefined
  /** First wait before a retry, doubling each time, jittered (default 1 second). */
  readonly backoff?: Duration.Input | undefined
}

/** One try's failure: whether another try may succeed, and where it failed. */
class AttemptError extends Schema.TaggedError<AttemptError>()("AttemptError", {
  endpoint: Schema.String,
  reason: Schema.String,
  retryable: Schema.Boolean
}) {}

const Candidate = Schema.Struct({ logprob: Schema.Number })
const CompletionResponse = Schema.Struct({
  choices: Schema.NonEmptyArray(Schema.Struct({
    prompt_logprobs: Schema.Array(Schema.NullOr(Schema.Record(Schema.String, Candidate)))
  }))
})
const decodeResponse = Schema.decodeUnknownEffect(CompletionResponse)

/** The error message of an OpenAI-style error body, else the start of the body. */
const errorMessage = (body: string) => {
  try {
    const message = (JSON.parse(body) as { error?: { message?: unknown } }).error?.message
    if (typeof message === "string") return message
  } catch {
    // not JSON: the text itself
  }
  return body.length > 200 ? `${body.slice(0, 200)}...` : body
}

/** An error and its causes' messages: fetch hides the reason (ECONNRESET, "other side closed") in `cause`. */
const describeCause = (error: Error): string => {
  const messages: Array<string> = []
  for (let at: unknown = error; at instanceof Error; at = at.cause) {
    if (at.message !== "" && !messages.includes(at.message)) messages.push(at.message)
  }
  return messages.join(": ")
}

/**
 * A server with vLLM's completions API (vLLM itself, or `cascade serve`). Each row is one request
 * (with document masking, each document of a row is one, which a server does naturally):
 * `prompt` = the real token ids plus one more token, `prompt_logprobs: K`, `max_tokens: 1`
 * (vLLM's minimum), `temperature: 0`. vLLM's `prompt_logprobs[j]` maps token ids to the log-prob
 * of the distribution of token j given the tokens before it, holding the top K and the prompt
 * token itself (beyond K with its rank); entry j + 1 is therefore the teacher at position j.
 * The extra token at the end makes the last real position's distribution one of those entries too,
 * keyed by token id. The completion's own `logprobs` would also give it, but keyed by token text,
 * which is ambiguous (vLLM's `return_tokens_as_token_ids` fixes that, `cascade serve` lacks it);
 * the extra token costs one position of the context instead.
 *
 * Requests of all batches share `concurrency` in flight, and batches are pulled only as
 * requests free up, so at most `concurrency` requests run ahead of the batch the consumer holds. Each
 * request goes to the endpoint with the fewest in flight. A 429, a 5xx, a failed connection, a timeout, or an answer that
 * cannot be read or has the wrong shape is tried again after an exponential backoff; another 4xx
 * fails at once. A request that never succeeds fails the stream with a TeacherError naming the
 * endpoint, the row and the last failure: no row is ever dropped or filled in.
 *
 * HTTP through effect's HttpClient over fetch: failures are typed values to retry on, and a
 * timeout interrupts the request, which aborts it and frees its connection.
 */
export const remote = (urls: ReadonlyArray<string>, options: RemoteOptions) =>
  Layer.effect(
    Teacher,
    Effect.gen(function*() {
      const client = yield* HttpClient.HttpClient
      const endpoints = urls.map((url) => url.replace(/\/+$/, ""))
      const source = `remote ${endpoints.join(", ")}`
      const k = options.topK
      const concurrency = options.concurrency ?? 8
      const retries = options.retries ?? 5
      const timeout = options.timeout ?? "5 minutes"
      if (endpoints.length === 0) return yield* new TeacherError({ source, reason: "no endpoint URL given" })
      if (!positiveInteger(k) || !positiveInteger(concurrency) || !(Number.isInteger(retries) && retries >= 0)) {
        return yield* new TeacherError({ source, reason: "top-k and concurrency must be positive integers, retries a non-negative one" })
      }

      const inFlight = endpoints.map(() => 0)
      let turn = 0
      /** The endpoint with the fewest requests in flight, ties taken in turn. */
      const withEndpoint = <A, E, R>(use: (endpoint: string) => Effect.Effect<A, E, R>) =>
        Effect.acquireUseRelease(
          Effect.sync(() => {
            let best = turn
            for (let i = 1; i < endpoints.length; i++) {
              const candidate = (turn + i) % endpoints.length
              if (inFlight[candidate] < inFlight[best]) best = candidate
            }
            inFlight[best]++
            turn = (best + 1) % endpoints.length
            return best
          }),
          (i) => use(endpoints[i]),
          (i) => Effect.sync(() => void inFlight[i]--)
        )

      /** One try: the top-k ids and log-probs of the tokens after each position but the last, [(positions - 1) * K]. */
      const ask = (endpoint: string, prompt: ReadonlyArray<number>) => {
        const failure = (reason: string, retryable = true) => new AttemptError({ endpoint, reason, retryable })
        const request = HttpClientRequest.post(`${endpoint}/v1/completions`).pipe(
          HttpClientRequest.bodyJsonUnsafe({
            ...(options.model === undefined ? {} : { model: options.model }),
            prompt,
            max_tokens: 1,
            temperature: 0,
            prompt_logprobs: k
          })
        )
        return client.execute(request).pipe(
          Effect.flatMap((response) => Effect.map(response.text, (body) => ({ status: response.status, body }))),
          Effect.timeoutOrElse({
            duration: timeout,
            orElse: () => Effect.fail(failure(`no answer within ${Duration.format(Duration.fromInputUnsafe(timeout))}`))
          }),
          Effect.mapError((error) =>
            error instanceof AttemptError ? error : failure(
              `${error.reason._tag === "TransportError" ? "connection failed" : "the answer could not be read"}: ${describeCause(error.reason)}`,
              error.reason._tag !== "EncodeError" && error.reason._tag !== "InvalidUrlError"
            )
          ),
          Effect.flatMap(({ status, body }) =>
            status === 200 ? parse(body, prompt.length, failure) : Effect.fail(failure(
              `HTTP ${status}: ${errorMessage(body)}`,
              status === 429 || status >= 500
            ))
          )
        )
      }

      const parse = (body: string, positions: number, failure: (reason: string) => AttemptError) =>
        Effect.gen(function*() {
          const json = yield* Effect.try({ try: (): unknown => JSON.parse(body), catch: () => failure("the answer is not valid JSON") })
          const response = yield* decodeResponse(json).pipe(
            Effect.mapError((error) => failure(`the answer is not a completion with prompt_logprobs (${error.message})`))
          )
          const scores = response.choices[0].prompt_logprobs
          if (scores.length !== positions) {
            return yield* failure(`prompt_logprobs has ${scores.length} positions for a prompt of ${positions} tokens`)
          }
          const ids = new Int32Array((positions - 1) * k)
          const logProbs = new Float32Array((positions - 1) * k)
          for (let j = 1; j < positions; j++) {
            const candidates = Object.entries(scores[j] ?? {}).map(([id, { logprob }]) => ({ id: Number(id), logprob }))
            if (candidates.length < k) return yield* failure(`prompt_logprobs[${j}] has ${candidates.length} candidates, fewer than ${k}`)
            if (!candidates.every(({ id }) => Number.isInteger(id) && id >= 0)) {
              return yield* failure(`prompt_logprobs[${j}] has a key that is not a token id`)
            }
            // The prompt token comes on top of the K when it is not among them: keep the K largest.
            candidates.sort((a, b) => b.logprob - a.logprob || a.id - b.id)
            for (let c = 0; c < k; c++) {
              ids[(j - 1) * k + c] = candidates[c].id
              logProbs[(j - 1) * k + c] = candidates[c].logprob
            }
          }
          return { ids, logProbs }
        })

      const retrying = Schedule.exponential(options.backoff ?? "1 second").pipe(Schedule.jittered)

      /**
       * Fills positions [from, to) of row `r` of `output` with the teacher's top-k for tokens
       * [from, to) read alone (the whole row, or one document of it), or fails naming the row.
       */
      const annotateSpan = (batch: Batch, r: number, from: number, to: number, output: { readonly ids: Int32Array; readonly logProbs: Float32Array }) => {
        const row = batch.rows[r]
        // Any token serves as the extra one (causality: nothing before it sees it); the last is a valid id.
        const prompt = [...row.ids.slice(from, to), row.ids[to - 1]]
        let attempts = 0
        return withEndpoint((endpoint) =>
          Effect.suspend(() => {
            attempts++
            return ask(endpoint, prompt)
          })
        ).pipe(
          Effect.retry({ schedule: retrying, times: retries, while: (error) => error.retryable }),
          Effect.mapError((error) =>
            new TeacherError({
              source: `remote ${error.endpoint}`,
              request: `row ${batch.indices[r]}${from === 0 ? "" : ` from token ${from}`}, a prompt of ${prompt.length} tokens`,
              reason: `${error.reason}${attempts > 1 ? ` (after ${attempts} tries)` : ""}`
            })
          ),
          Effect.map(({ ids, logProbs }) => {
            const at = (r * row.ids.length + from) * k
            output.ids.set(ids, at)
            output.logProbs.set(logProbs, at)
          })
        )
      }

      /** The requests of row `r`: the row, or each of its documents on its own with document masking. */
      const spansOf = (batch: Batch, r: number): Array<{ readonly from: number; readonly to: number }> => {
        const row = batch.rows[r]
        if (row.length === 0) return []
        const starts = batch.documentMask ? row.starts.filter((start) => start < row.length) : [0]
        return starts.map((from, i) => ({ from, to: starts[i + 1] ?? row.length }))
      }

      return Teacher.of({
        describe: `${source} (top-${k})`,
        vocab: undefined,
        annotate: (batches) =>
          batches.pipe(
            // A completion of token ids carries no pixels: the server would see its image tokens blind.
            Stream.mapEffect((batch) =>
              batch.rows.some((row) => (row.images?.length ?? 0) > 0)
                ? Effect.fail(new TeacherError({ source, request: describeBatch(batch), reason: "the rows have images, which a remote teacher is not sent: use a teacher in process" }))
                : Effect.succeed(batch)
            ),
            // Requests of consecutive batches share the ones in flight. Results come back in order, so
            // a batch is complete when its last request is (a batch with none is closed by a no-op).
            Stream.flatMap((batch) => {
              const size = batch.rows.length * (batch.rows[0]?.ids.length ?? 0) * k
              const output = { ids: new Int32Array(size), logProbs: new Float32Array(size) }
              const requests = batch.rows.flatMap((_, r) => spansOf(batch, r).map((span) => ({ r, ...span })))
              const work = requests.length === 0 ? [undefined] : requests
              return Stream.fromIterable(work.map((request, i) => ({ batch, output, request, last: i === work.length - 1 })))
            }),
            Stream.mapEffect(({ batch, output, request, last }) =>
              (request === undefined ? Effect.void : annotateSpan(batch, request.r, request.from, request.to, output)).pipe(
                Effect.as({ annotated: { batch, teacher: { _tag: "TopK", k, ...output } } satisfies Annotated, last })
              ), { concurrency }),
            Stream.filter(({ last }) => last),
            Stream.map(({ annotated }) => annotated)
          )
      })
    })
  ).pipe(Layer.provide(FetchHttpClient.layer))

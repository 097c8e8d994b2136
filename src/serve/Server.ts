/**
 * An OpenAI-compatible HTTP API over one model and its tokenizer:
 *
 * - `GET /v1/models`
 * - `POST /v1/completions`: `prompt` as a string, a list of strings, token ids or a list of those;
 *   `max_tokens`, `temperature`, `top_p`, `seed`, `stop`, `echo`, `logprobs` (the legacy format) and
 *   vLLM's `prompt_logprobs`.
 * - `POST /v1/chat/completions`: `messages` through the tokenizer's chat template; `max_tokens` or
 *   `max_completion_tokens`, `temperature`, `top_p`, `seed`, `stop`, `logprobs` and `top_logprobs`.
 *   For a Mistral 3 model a message's content may hold `image_url` parts whose URL is a base64
 *   `data:` URL (PNG or JPEG; nothing is fetched): the template renders their placeholders, each
 *   expanded into its image's token grid, and the image features enter in the prompt's pass.
 *
 * Both take `n` (samples per prompt, each with its own finish reason and log-probs; with `seed`
 * sample i of prompt p draws from its own stream, so the same seed gives the same samples), vLLM's
 * `ignore_eos`, and `stream` (server-sent events in OpenAI's chunk format, with `stream_options.include_usage` and a
 * final `data: [DONE]`; a failure once streaming is an `error` event before it). Streamed text is
 * held back while it could still be cut by a stop string or end in an incomplete character, so the
 * chunks add up to the text a request without `stream` gets.
 *
 * Requests are decoded together (continuous batching, see Batcher.ts): a request that arrives while
 * others decode joins their batch. At most `maxQueue` requests wait for a place in the batch; more
 * get a 429 with `Retry-After`. A request not finished within `requestTimeout` seconds gets a 408
 * (an `error` event when streaming), and a client that goes away drops its rows from the batch.
 *
 * Token texts in log-probs are each token decoded alone, text offsets count code points, and
 * log-probs are clamped at -9999, as vLLM does. Generation stops at the tokenizer's EOS token.
 * Bad requests get a 4xx with OpenAI's error body, `{"error": {"message", "type", "param", "code"}}`;
 * a failure of the server's own is a 500 with the same body, and the server goes on serving.
 *
 * Without a tokenizer (a model folder with no tokenizer.json, like vLLM's `--skip-tokenizer-init`)
 * it serves token-id prompts, which is all a distillation teacher needs: completions have empty
 * text, `prompt_logprobs` a null `decoded_token`, and the legacy `logprobs` name tokens
 * `token_id:ID` (vLLM's `--return-tokens-as-token-ids`). What needs the tokenizer (text prompts,
 * chat, stop strings, echo) is a 400 saying that the model folder has none.
 */
import { NodeHttpServer } from "@effect/platform-node"
import { Effect, Exit, Layer, Schema, SchemaIssue, Stream } from "effect"
import { HttpEffect, HttpRouter, HttpServerRequest, HttpServerResponse } from "effect/http"
import { createServer } from "node:http"
import type * as Generate from "../model/Generate.ts"
import type * as Model from "../model/Model.ts"
import type * as Tokenizer from "../io/Tokenizer.ts"
import * as Images from "../data/Images.ts"
import * as ImageSide from "../data/ImageSide.ts"
import * as Batcher from "./Batcher.ts"

export interface Served {
  readonly model: Model.Model
  /** Undefined for a model folder without one: token-id prompts only. */
  readonly tokenizer: Tokenizer.Tokenizer | undefined
  /** The name clients give as `model`, and `/v1/models` lists. */
  readonly name: string
  /** The largest `logprobs` / `prompt_logprobs` / `top_logprobs` a request may ask for (vLLM's --max-logprobs, 20 by default). */
  readonly maxLogprobs?: number
  /** A Mistral 3 model's image side: chat messages may then hold images (`image_url` parts with data URLs). */
  readonly images?: ImageSide.ImageSide | undefined
}

export interface ServeOptions extends Partial<Limits> {
  readonly host: string
  readonly port: number
  readonly logRequests?: boolean
}

/** How much the server takes on at once. */
export interface Limits {
  /** Sequences (samples) decoded together at most (vLLM's --max-num-seqs). Default 32. */
  readonly maxBatch: number
  /** Requests waiting for a place in the batch at most; more get a 429. Default 64. */
  readonly maxQueue: number
  /** Seconds a request may take, waiting included, before a 408. Default 600. */
  readonly requestTimeout: number
}

export const defaultLimits: Limits = { maxBatch: 32, maxQueue: 64, requestTimeout: 600 }

/**
 * Serves the API on `host`:`port` (0: a free port; the `HttpServer` service says which), logging a
 * line per request unless `logRequests` is false (a server inside a pipeline would bury its output).
 */
export const layer = (served: Served, options: ServeOptions) =>
  HttpRouter.serve(routes(served, { ...defaultLimits, ...definedOnly(options) }), {
    disableLogger: true,
    disableListenLog: true,
    middleware: options.logRequests === false ? undefined : logRequest
  }).pipe(
    Layer.provideMerge(NodeHttpServer.layer(createServer, { host: options.host, port: options.port }))
  )

const definedOnly = ({ maxBatch, maxQueue, requestTimeout }: Partial<Limits>): Partial<Limits> =>
  Object.fromEntries(Object.entries({ maxBatch, maxQueue, requestTimeout }).filter(([, value]) => value !== undefined))

/** vLLM's default cap on `logprobs` and `prompt_logprobs`. */
const DEFAULT_MAX_LOGPROBS = 20
/** OpenAI's default `max_tokens` for completions. */
const DEFAULT_MAX_TOKENS = 16
/** Seconds a client refused for a full queue is told to wait. */
const RETRY_AFTER_SECONDS = 1

class ApiError extends Schema.TaggedError<ApiError>()("ApiError", {
  status: Schema.Number,
  message: Schema.String,
  type: Schema.String,
  param: Schema.NullOr(Schema.String),
  code: Schema.NullOr(Schema.String)
}) {}

const invalid = (message: string, param: string | null = null, code: string | null = null) =>
  new ApiError({ status: 400, type: "invalid_request_error", message, param, code })

const errorBody = (error: ApiError) => ({ error: { message: error.message, type: error.type, param: error.param, code: error.code } })

const errorResponse = (error: ApiError) =>
  HttpServerResponse.jsonUnsafe(errorBody(error), {
    status: error.status,
    headers: error.status === 429 ? { "retry-after": String(RETRY_AFTER_SECONDS) } : undefined
  })

/** A 500 for a failure of the server's own, logged. */
const serverError = (defect: unknown) =>
  Effect.logError("request failed", defect).pipe(Effect.as(
    new ApiError({
      status: 500,
      type: "server_error",
      message: `The server failed while processing the request: ${defect instanceof Error ? defect.message : String(defect)}`,
      param: null,
      code: null
    })
  ))

const Optional = <S extends Schema.Top>(schema: S) => Schema.optional(Schema.NullOr(schema))
const Count = Schema.Int.check(Schema.isGreaterThanOrEqualTo(0))
const TopCount = Schema.Int.check(Schema.isGreaterThanOrEqualTo(0))

/** Fields both endpoints take. */
const Common = {
  model: Optional(Schema.String),
  temperature: Optional(Schema.Number.check(Schema.isGreaterThanOrEqualTo(0))),
  top_p: Optional(Schema.Number.check(Schema.isGreaterThan(0), Schema.isLessThanOrEqualTo(1))),
  seed: Optional(Schema.Int),
  stop: Optional(Schema.Union([Schema.String, Schema.Array(Schema.String)])),
  max_tokens: Optional(Count),
  n: Optional(Schema.Int.check(Schema.isGreaterThanOrEqualTo(1))),
  stream: Optional(Schema.Boolean),
  stream_options: Optional(Schema.Struct({ include_usage: Optional(Schema.Boolean) })),
  /** vLLM's: generate past the EOS token, to `max_tokens` (benchmarks). */
  ignore_eos: Optional(Schema.Boolean)
}

const CompletionRequest = Schema.Struct({
  ...Common,
  prompt: Schema.Union([
    Schema.String,
    Schema.Array(Schema.String),
    Schema.Array(Schema.Int),
    Schema.Array(Schema.Array(Schema.Int))
  ]),
  echo: Optional(Schema.Boolean),
  logprobs: Optional(TopCount),
  prompt_logprobs: Optional(TopCount)
})

const ChatRequest = Schema.Struct({
  ...Common,
  messages: Schema.Array(Schema.Struct({
    role: Schema.String,
    content: Schema.Union([
      Schema.String,
      Schema.Array(Schema.Union([
        Schema.Struct({ type: Schema.Literal("text"), text: Schema.String }),
        Schema.Struct({ type: Schema.Literal("image_url"), image_url: Schema.Struct({ url: Schema.String }) })
      ]))
    ])
  })).check(Schema.isMinLength(1)),
  max_completion_tokens: Optional(Count),
  logprobs: Optional(Schema.Boolean),
  top_logprobs: Optional(TopCount)
})

const routes = (served: Served, limits: Limits) =>
  HttpRouter.use(Effect.fnUntraced(function*(router) {
    const batcher = yield* Batcher.make(served.model, { ...limits, timeoutSeconds: limits.requestTimeout })
    const api = makeApi(served, batcher, limits)
    yield* router.addAll([
      HttpRouter.route("GET", "/v1/models", handle(Effect.succeed(api.models))),
      HttpRouter.route("POST", "/v1/completions", handle(Effect.flatMap(body(CompletionRequest), api.completions))),
      HttpRouter.route("POST", "/v1/chat/completions", handle(Effect.flatMap(body(ChatRequest), api.chat))),
      HttpRouter.route("*", "*", (request) =>
        handle(Effect.fail(new ApiError({
          status: 404,
          type: "invalid_request_error",
          message: `Unknown request URL: ${request.method} ${request.url}`,
          param: null,
          code: "unknown_url"
        }))))
    ])
  }))

/** Answers with the JSON (or the response) a handler returns, or with the error it failed or died with. */
const handle = <R>(handler: Effect.Effect<unknown, ApiError, R>) =>
  handler.pipe(
    Effect.map((result) => (HttpServerResponse.isHttpServerResponse(result) ? result : HttpServerResponse.jsonUnsafe(result))),
    Effect.catchTag("ApiError", (error) => Effect.succeed(errorResponse(error))),
    Effect.catchDefect((defect) => Effect.map(serverError(defect), errorResponse))
  )

/**
 * Server-sent events of the chunks, then `[DONE]`; a failure becomes an `error` event before it.
 * The request's scope (which holds its place in the batch) closes when the stream ends, so a client
 * that goes away mid-stream drops its rows.
 */
const eventStream = (chunks: Stream.Stream<unknown, ApiError>) =>
  Effect.sync(() => {
    const event = (json: unknown) => `data: ${JSON.stringify(json)}\n\n`
    const body = chunks.pipe(
      Stream.map(event),
      Stream.catchTag("ApiError", (error) => Stream.succeed(event(errorBody(error)))),
      Stream.catchDefect((defect) => Stream.fromEffect(Effect.map(serverError(defect), (error) => event(errorBody(error))))),
      Stream.concat(Stream.succeed("data: [DONE]\n\n")),
      Stream.encodeText
    )
    return HttpEffect.scopeTransferToStream(
      HttpServerResponse.stream(body, { contentType: "text/event-stream", headers: { "cache-control": "no-cache" } })
    )
  })

/** The request's JSON body decoded with `schema`; a 400 naming the first bad field otherwise. */
const body = <S extends Schema.Top & { readonly DecodingServices: never }>(schema: S) =>
  Effect.gen(function*() {
    const request = yield* HttpServerRequest.HttpServerRequest
    const text = yield* request.text.pipe(Effect.mapError(() => invalid("The request body could not be read.")))
    const json = yield* Effect.try({
      try: (): unknown => JSON.parse(text),
      catch: () => invalid("The request body is not valid JSON.")
    })
    return yield* Schema.decodeUnknownEffect(schema)(json).pipe(
      Effect.mapError((error) => {
        const [issue] = SchemaIssue.makeFormatterStandardSchemaV1()(error.issue).issues
        const path = (issue.path ?? []).map(String)
        return invalid(path.length === 0 ? issue.message : `${path.join(".")}: ${issue.message}`, path[0] ?? null)
      })
    )
  })

/** One log line per request: method, path, status and time taken. */
const logRequest = <E, R>(app: Effect.Effect<HttpServerResponse.HttpServerResponse, E, R>) =>
  Effect.gen(function*() {
    const request = yield* HttpServerRequest.HttpServerRequest
    const start = Date.now()
    return yield* app.pipe(Effect.onExit((exit) => {
      const status = Exit.isSuccess(exit) ? exit.value.status : Exit.hasInterrupts(exit) ? "aborted" : "failed"
      return Effect.log(`${request.method} ${request.url} ${status} ${Date.now() - start}ms`)
    }))
  })

type CompletionRequest = typeof CompletionRequest.Type
type ChatRequest = typeof ChatRequest.Type

/** A prompt as token ids, with its text when it came as one. */
interface Prompt {
  readonly ids: ReadonlyArray<number>
  readonly text: string | undefined
}

/** The endpoints' work over the served model, decoded by `batcher`. */
const makeApi = ({ model, tokenizer, name, maxLogprobs: maxCount, images: side }: Served, batcher: Batcher.Batcher, limits: Limits) => {
  const { vocabSize, maxPositionEmbeddings } = model.config
  const stopTokenIds = [...new Set([tokenizer?.eosId, model.config.eosTokenId])].filter((id) => id !== undefined)
  const now = () => Math.floor(Date.now() / 1000)
  const started = now()

  /** A 400 for what cannot be done without a tokenizer. */
  const withoutTokenizer = (consequence: string, param: string) =>
    invalid(`The model folder ${name} has no tokenizer (tokenizer.json), so ${consequence}.`, param)

  const checkCommon = (request: CompletionRequest | ChatRequest) => {
    if (request.model != null && request.model !== name) {
      return Effect.fail(new ApiError({
        status: 404,
        type: "invalid_request_error",
        message: `The model \`${request.model}\` does not exist.`,
        param: "model",
        code: "model_not_found"
      }))
    }
    if (request.stream_options != null && request.stream !== true) {
      return Effect.fail(invalid("stream_options is only allowed when stream is true.", "stream_options"))
    }
    if (request.n != null && request.n > limits.maxBatch) {
      return Effect.fail(invalid(`n must be at most ${limits.maxBatch} (the server's --max-batch).`, "n"))
    }
    if (tokenizer === undefined && request.stop != null && request.stop.length > 0) {
      return Effect.fail(withoutTokenizer("stop strings cannot be matched", "stop"))
    }
    const maxLogprobs = maxCount ?? DEFAULT_MAX_LOGPROBS
    const counts: Array<[string, unknown]> = "messages" in request
      ? [["top_logprobs", request.top_logprobs]]
      : [["logprobs", request.logprobs], ["prompt_logprobs", request.prompt_logprobs]]
    for (const [param, count] of counts) {
      if (typeof count === "number" && count > maxLogprobs) {
        return Effect.fail(invalid(`${param} must be at most ${maxLogprobs} (the server's --max-logprobs).`, param))
      }
    }
    return Effect.void
  }

  const checkPrompt = (ids: ReadonlyArray<number>, maxTokens: number) => {
    if (ids.length === 0) return Effect.fail(invalid("The prompt is empty.", "prompt"))
    const outside = ids.find((id) => id < 0 || id >= vocabSize)
    if (outside !== undefined) {
      return Effect.fail(invalid(`Token id ${outside} is outside the vocabulary (0 to ${vocabSize - 1}).`, "prompt"))
    }
    if (ids.length + maxTokens > maxPositionEmbeddings) {
      return Effect.fail(invalid(
        `This model's maximum context length is ${maxPositionEmbeddings} tokens. However, you requested ` +
          `${ids.length + maxTokens} tokens (${ids.length} in the prompt, ${maxTokens} for the completion). ` +
          "Please reduce the length of the prompt or of the completion.",
        ids.length > maxPositionEmbeddings ? "prompt" : "max_tokens",
        "context_length_exceeded"
      ))
    }
    return Effect.void
  }

  /**
   * Queues `n` samples of each prompt in the running batch with the request's sampling fields; a
   * 429 when the queue is full. Their steps come as decoded, a 408 ending them at the time limit.
   */
  const submit = (
    prompts: ReadonlyArray<ReadonlyArray<number>>,
    request: CompletionRequest | ChatRequest,
    options: Pick<Generate.Options, "maxNewTokens" | "topLogprobs" | "promptLogprobs">,
    images?: ReadonlyArray<Batcher.PromptImages | undefined>
  ) =>
    batcher.submit(prompts, request.n ?? 1, {
      ...options,
      temperature: request.temperature ?? 1,
      topP: request.top_p ?? 1,
      seed: request.seed ?? undefined,
      stopTokenIds: request.ignore_eos === true ? [] : stopTokenIds,
      stopStrings: stopStrings(request),
      decode: tokenizer && decodeText
    }, images).pipe(
      Effect.map(Stream.mapError((timedOut) =>
        new ApiError({
          status: 408,
          type: "timeout_error",
          message: `The request did not finish within the server's --request-timeout of ${timedOut.seconds} s.`,
          param: null,
          code: "request_timeout"
        })
      )),
      Effect.mapError((full) =>
        new ApiError({
          status: 429,
          type: "rate_limit_error",
          message: `The server is busy: ${full.waiting} requests are waiting (its --max-queue). Retry in a moment.`,
          param: null,
          code: "queue_full"
        })
      )
    )

  /** Every sample's generation, prompt by prompt (choice p * n + s is sample s of prompt p); other steps are dropped as they come. */
  const collect = (steps: Stream.Stream<Batcher.Step, ApiError>, n: number) => {
    const generations: Array<Generate.Generation> = []
    return Stream.runForEach(steps, (step) =>
      Effect.sync(() => {
        if (step.generation) generations[step.prompt * n + step.sample] = step.generation
      })).pipe(Effect.as(generations))
  }

  const stopStrings = (request: CompletionRequest | ChatRequest) =>
    typeof request.stop === "string" ? [request.stop] : request.stop ?? []

  const decodeText = (ids: ReadonlyArray<number>) => tokenizer?.decode(ids, { skipSpecialTokens: true }) ?? ""

  /**
   * Streams each choice's text as its steps come, chunk by chunk, and the usage at the end when
   * asked for: `chunk(step, text, first)` builds a step's chunk from the text it adds.
   */
  const streamChoices = (
    steps: Stream.Stream<Batcher.Step, ApiError>,
    request: CompletionRequest | ChatRequest,
    prompts: ReadonlyArray<ReadonlyArray<number>>,
    chunk: (step: Batcher.Step, text: string, first: boolean) => unknown,
    usageChunk: (usage: Usage) => unknown
  ) => {
    const n = request.n ?? 1
    const texts = Array.from({ length: prompts.length * n }, () => textStream(stopStrings(request)))
    const generations: Array<Generate.Generation> = []
    const chunks = steps.pipe(Stream.map((step) => {
      const index = step.prompt * n + step.sample
      const text = texts[index]
      const first = !text.started
      if (step.generation) generations.push(step.generation)
      return chunk(step, step.generation ? text.last(step.generation.text ?? "") : text.next(decodeText(step.tokens)), first)
    }))
    const tail = Stream.suspend(() =>
      request.stream_options?.include_usage === true ? Stream.succeed(usageChunk(usage(prompts, generations))) : Stream.empty
    )
    return eventStream(Stream.concat(chunks, tail))
  }

  /** A token's text: the token decoded alone, special tokens included (vLLM's `decoded_token`); null without a tokenizer. */
  const tokenText = (token: number) => tokenizer?.decode([token]) ?? null
  /** A token as the legacy `logprobs` name it: its text, or `token_id:ID` without a tokenizer. */
  const tokenName = (token: number) => tokenText(token) ?? `token_id:${token}`

  /**
   * OpenAI's legacy `logprobs`: the token itself and the top n per position; null where unscored.
   * Text offsets start at `offset` (a streamed chunk's place in its choice's text).
   */
  const legacyLogprobs = (
    entries: ReadonlyArray<{ token: number; scored: Generate.TokenLogprob | undefined }>,
    n: number,
    offset = 0
  ) => {
    const tokens = entries.map(({ token }) => tokenName(token))
    return {
      tokens,
      token_logprobs: entries.map(({ scored }) => (scored ? clamp(scored.logprob) : null)),
      top_logprobs: entries.map(({ scored }, i) =>
        scored
          ? Object.fromEntries([
            [tokens[i], clamp(scored.logprob)],
            ...scored.top.slice(0, n).map((candidate) => [tokenName(candidate.token), clamp(candidate.logprob)])
          ])
          : null
      ),
      text_offset: tokens.map((token) => {
        const at = offset
        offset += [...token].length
        return at
      })
    }
  }

  /**
   * vLLM's `prompt_logprobs`: per position a map from token id to `{logprob, rank, decoded_token}`
   * holding the prompt token (with its rank in the vocabulary) and the top k; null for the first.
   */
  const promptLogprobs = (scores: ReadonlyArray<Generate.TokenLogprob | undefined>, k: number) => {
    const entry = (token: number, logprob: number, rank: number) =>
      [String(token), { logprob: clamp(logprob), rank, decoded_token: tokenText(token) }] as const
    return scores.map((scored) =>
      scored === undefined ? null : Object.fromEntries([
        entry(scored.token, scored.logprob, scored.rank),
        ...scored.top.slice(0, k).map((candidate, i) => entry(candidate.token, candidate.logprob, i + 1))
      ])
    )
  }

  /** The chat API's `logprobs.content`. */
  const chatLogprobs = (scores: ReadonlyArray<Generate.TokenLogprob>, n: number) => {
    const describe = (token: number, logprob: number) => {
      const text = tokenName(token)
      return { token: text, logprob: clamp(logprob), bytes: [...new TextEncoder().encode(text)] }
    }
    return scores.map((scored) => ({
      ...describe(scored.token, scored.logprob),
      top_logprobs: scored.top.slice(0, n).map((candidate) => describe(candidate.token, candidate.logprob))
    }))
  }

  /** The request's prompts as token ids; texts go through the tokenizer, which adds BOS. */
  const prompts = (prompt: CompletionRequest["prompt"]): Effect.Effect<Array<Prompt>, ApiError> => {
    const items: ReadonlyArray<string | ReadonlyArray<number>> = typeof prompt === "string"
      ? [prompt]
      : prompt.every((item) => typeof item === "number")
      ? [prompt as ReadonlyArray<number>]
      : prompt as ReadonlyArray<string | ReadonlyArray<number>>
    if (tokenizer === undefined && items.some((item) => typeof item === "string")) {
      return Effect.fail(withoutTokenizer("prompts must be token ids", "prompt"))
    }
    return Effect.succeed(items.map((item) =>
      typeof item === "string" ? { ids: tokenizer!.encode(item), text: item } : { ids: item, text: undefined }
    ))
  }

  const completions = Effect.fnUntraced(function*(request: CompletionRequest) {
    yield* checkCommon(request)
    const maxTokens = request.max_tokens ?? DEFAULT_MAX_TOKENS
    const inputs = yield* prompts(request.prompt)
    for (const { ids } of inputs) yield* Effect.andThen(checkPrompt(ids, maxTokens), withoutPlaceholders(ids, "prompt"))
    const echo = request.echo === true
    if (echo && tokenizer === undefined) return yield* withoutTokenizer("the prompt cannot be echoed as text", "echo")
    const topLogprobs = request.logprobs ?? undefined
    // Echoed log-probs need the prompt scored as well, as in vLLM.
    const promptTop = [request.prompt_logprobs, echo ? topLogprobs : undefined].filter((k) => k != null)
    const ids = inputs.map((input) => input.ids)
    const n = request.n ?? 1
    const steps = yield* submit(ids, request, {
      maxNewTokens: maxTokens,
      topLogprobs,
      promptLogprobs: promptTop.length === 0 ? undefined : Math.max(...promptTop)
    })
    const id = `cmpl-${crypto.randomUUID()}`
    const created = now()
    const completion = (choices: ReadonlyArray<unknown>) => ({ id, object: "text_completion", created, model: name, choices })
    /** A choice's log-probs, with its echoed prompt's before the tokens, for what a (streamed) choice adds. */
    const scoredEntries = (prompt: number, scores: ReadonlyArray<Generate.TokenLogprob | undefined> | undefined, tokens: ReadonlyArray<Generate.TokenLogprob>) => [
      ...(echo ? inputs[prompt].ids.map((token, i) => ({ token, scored: scores?.[i] })) : []),
      ...tokens.map((scored) => ({ token: scored.token, scored }))
    ]
    const echoed = (prompt: number) => (echo ? inputs[prompt].text ?? tokenizer?.decode(inputs[prompt].ids) : "")
    const finish = (generation: Generate.Generation | undefined) => ({
      finish_reason: generation?.finishReason ?? null,
      stop_reason: typeof generation?.stopReason === "string" ? generation.stopReason : null
    })
    const promptScores = (scores: ReadonlyArray<Generate.TokenLogprob | undefined> | undefined) =>
      request.prompt_logprobs == null ? null : promptLogprobs(scores ?? [], request.prompt_logprobs)

    if (request.stream === true) {
      const offsets = new Array<number>(inputs.length * n).fill(0)
      return yield* streamChoices(steps, request, ids, (step, text, first) => {
        const index = step.prompt * n + step.sample
        const entries = first
          ? scoredEntries(step.prompt, step.promptLogprobs, step.token ? [step.token] : [])
          : step.token ? [{ token: step.token.token, scored: step.token }] : []
        const logprobs = topLogprobs === undefined ? null : legacyLogprobs(entries, topLogprobs, offsets[index])
        if (logprobs) offsets[index] += logprobs.tokens.reduce((sum, token) => sum + [...token].length, 0)
        return completion([{
          index,
          text: (first ? echoed(step.prompt) : "") + text,
          logprobs,
          ...finish(step.generation),
          ...(first && request.prompt_logprobs != null ? { prompt_logprobs: promptScores(step.promptLogprobs) } : {})
        }])
      }, (usage) => ({ ...completion([]), usage }))
    }

    const generations = yield* collect(steps, n)
    return {
      ...completion(generations.map((generation, index) => {
        const prompt = Math.floor(index / n)
        return {
          index,
          text: echoed(prompt) + (generation.text ?? ""),
          logprobs: topLogprobs === undefined ? null : legacyLogprobs(scoredEntries(prompt, generation.promptLogprobs, generation.logprobs), topLogprobs),
          ...finish(generation),
          prompt_logprobs: promptScores(generation.promptLogprobs)
        }
      })),
      usage: usage(ids, generations)
    }
  })

  /** A 400 for image placeholders in a prompt that brings no image: they would take another request's features in a shared batch. */
  const withoutPlaceholders = (ids: ReadonlyArray<number>, param: string) => {
    const placeholders = side === undefined ? 0 : ids.filter((id) => id === side.tokens.image).length
    return placeholders === 0
      ? Effect.void
      : Effect.fail(invalid(`The prompt holds ${placeholders} image placeholders (token ${side!.tokens.image}) but no image: send pictures as image_url parts of a chat message.`, param))
  }

  /**
   * A chat prompt's images: each `data:` URL decoded and preprocessed for the model's image side, its
   * placeholder in `ids` expanded into its token grid, and the projected features, released with the
   * request. A 400 for an image the model cannot see, a URL that is not a data URL, or a bad image.
   */
  const withImages = (ids: ReadonlyArray<number>, urls: ReadonlyArray<string>) =>
    Effect.gen(function*() {
      if (urls.length === 0) {
        yield* withoutPlaceholders(ids, "messages")
        return { ids, images: undefined }
      }
      if (side === undefined) return yield* invalid(`The model ${name} has no image side (not a Mistral 3 with its vision encoder): it cannot read image_url parts.`, "messages")
      const pictures = yield* Effect.forEach(urls, (url, i) => {
        const data = /^data:image\/[a-z+.-]+;base64,(.*)$/s.exec(url)
        if (data === null) return invalid(`Image ${i + 1} is not a base64 data: URL (the server fetches nothing).`, "messages")
        return Images.decodeBytes(`image ${i + 1}`, Buffer.from(data[1], "base64")).pipe(
          Effect.map((pixels) => Images.preprocess(pixels, side.processor)),
          Effect.mapError((error) => invalid(`${error.message}.`, "messages"))
        )
      })
      const expanded = Images.expandPlaceholders(ids, pictures, side.processor, side.tokens)
      if (expanded === undefined) return yield* invalid(`The chat template rendered ${ids.filter((id) => id === side.tokens.image).length} image placeholders for ${urls.length} images.`, "messages")
      return { ids: expanded, images: yield* ImageSide.projected(side, pictures) }
    })

  const chat = Effect.fnUntraced(function*(request: ChatRequest) {
    yield* checkCommon(request)
    if (request.top_logprobs != null && request.top_logprobs > 0 && request.logprobs !== true) {
      return yield* invalid("top_logprobs requires logprobs to be true.", "top_logprobs")
    }
    if (tokenizer === undefined) {
      return yield* withoutTokenizer("it has no chat template: send token-id prompts to /v1/completions", "messages")
    }
    const urls = request.messages.flatMap(({ content }) => (typeof content === "string" ? [] : content.flatMap((part) => (part.type === "image_url" ? [part.image_url.url] : []))))
    const messages = request.messages.map(({ role, content }) => ({
      role,
      // Text alone as one string, as before images; with images, the parts as HF chat templates take them.
      content: typeof content === "string"
        ? content
        : urls.length === 0
        ? content.map((part) => (part.type === "text" ? part.text : "")).join("")
        : content.map((part) => (part.type === "text" ? part : { type: "image" as const }))
    }))
    const text = yield* tokenizer.applyChatTemplate(messages, { addGenerationPrompt: true }).pipe(
      Effect.mapError((error) => invalid(error.message, "messages"))
    )
    // The template holds the special tokens (BOS) itself, so none are added, as in transformers and vLLM.
    const { ids, images } = yield* withImages(tokenizer.encode(text, { addSpecialTokens: false }), urls)
    const maxTokens = request.max_completion_tokens ?? request.max_tokens ?? Math.max(0, maxPositionEmbeddings - ids.length)
    yield* checkPrompt(ids, maxTokens)
    const topLogprobs = request.logprobs === true ? request.top_logprobs ?? 0 : undefined
    const steps = yield* submit([ids], request, { maxNewTokens: maxTokens, topLogprobs }, [images])
    const id = `chatcmpl-${crypto.randomUUID()}`
    const created = now()
    const reply = (object: string, choices: ReadonlyArray<unknown>) => ({ id, object, created, model: name, choices })
    const logprobs = (scores: ReadonlyArray<Generate.TokenLogprob>) =>
      topLogprobs === undefined ? null : { content: chatLogprobs(scores, topLogprobs) }
    const finish = (generation: Generate.Generation | undefined) => ({
      finish_reason: generation?.finishReason ?? null,
      stop_reason: typeof generation?.stopReason === "string" ? generation.stopReason : null
    })

    if (request.stream === true) {
      return yield* streamChoices(steps, request, [ids], (step, content, first) =>
        reply("chat.completion.chunk", [{
          index: step.sample,
          delta: first ? { role: "assistant", content } : { content },
          logprobs: logprobs(step.token ? [step.token] : []),
          ...finish(step.generation)
        }]), (usage) => ({ ...reply("chat.completion.chunk", []), usage }))
    }

    const generations = yield* collect(steps, request.n ?? 1)
    return {
      ...reply("chat.completion", generations.map((generation, index) => ({
        index,
        message: { role: "assistant", content: generation.text ?? "" },
        logprobs: logprobs(generation.logprobs),
        ...finish(generation)
      }))),
      usage: usage([ids], generations)
    }
  })

  const models = {
    object: "list",
    data: [{ id: name, object: "model", created: started, owned_by: "cascade", max_model_len: maxPositionEmbeddings }]
  }

  return { models, completions, chat }
}

/** JSON has no -Infinity; OpenAI and vLLM report -9999 instead. */
const clamp = (logprob: number) => Math.max(logprob, -9999)

interface Usage {
  readonly prompt_tokens: number
  readonly completion_tokens: number
  readonly total_tokens: number
}

/** Each prompt counted once, however many samples it has. */
const usage = (prompts: ReadonlyArray<ReadonlyArray<number>>, generations: ReadonlyArray<Generate.Generation>): Usage => {
  const promptTokens = prompts.reduce((sum, ids) => sum + ids.length, 0)
  const completionTokens = generations.reduce((sum, generation) => sum + generation.tokens.length, 0)
  return { prompt_tokens: promptTokens, completion_tokens: completionTokens, total_tokens: promptTokens + completionTokens }
}

/**
 * A choice's text as it streams: what can be sent without taking it back. The end of the decoded
 * text is held back while it is an incomplete character (U+FFFD) or could begin a stop string.
 */
const textStream = (stops: ReadonlyArray<string>) => {
  let sent = ""
  let started = false
  const send = (text: string) => {
    started = true
    const delta = text.startsWith(sent) ? text.slice(sent.length) : ""
    sent += delta
    return delta
  }
  return {
    get started() {
      return started
    },
    /** The new part of the text decoded so far that is safe to send. */
    next: (text: string) => {
      let safe = text.replace(/\uFFFD+$/, "")
      const held = Math.max(0, ...stops.map((stop) => heldBack(safe, stop)))
      safe = safe.slice(0, safe.length - held)
      return send(safe)
    },
    /** The rest of the final text. */
    last: send
  }
}

/** The length of the longest end of `text` that begins `stop` without being all of it. */
const heldBack = (text: string, stop: string) => {
  for (let length = Math.min(stop.length - 1, text.length); length > 0; length--) {
    if (text.endsWith(stop.slice(0, length))) return length
  }
  return 0
}

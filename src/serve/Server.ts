/**
 * An OpenAI-compatible HTTP API over one model and its tokenizer:
 *
 * - `GET /v1/models`
 * - `POST /v1/completions`: `prompt` as a string, a list of strings, token ids or a list of those;
 *   `max_tokens`, `temperature`, `top_p`, `seed`, `stop`, `echo`, `logprobs` (the legacy format) and
 *   vLLM's `prompt_logprobs`.
 * - `POST /v1/chat/completions`: `messages` through the tokenizer's chat template; `max_tokens` or
 *   `max_completion_tokens`, `temperature`, `top_p`, `seed`, `stop`, `logprobs` and `top_logprobs`.
 *
 * Token texts in log-probs are each token decoded alone, text offsets count code points, and
 * log-probs are clamped at -9999, as vLLM does. Generation stops at the tokenizer's EOS token.
 * Bad requests get a 4xx with OpenAI's error body, `{"error": {"message", "type", "param", "code"}}`;
 * a failure of the server's own is a 500 with the same body, and the server goes on serving.
 * Model work is serialised, so that at most one request holds tensors at a time.
 *
 * Without a tokenizer (a model folder with no tokenizer.json, like vLLM's `--skip-tokenizer-init`)
 * it serves token-id prompts, which is all a distillation teacher needs: completions have empty
 * text, `prompt_logprobs` a null `decoded_token`, and the legacy `logprobs` name tokens
 * `token_id:ID` (vLLM's `--return-tokens-as-token-ids`). What needs the tokenizer (text prompts,
 * chat, stop strings, echo) is a 400 saying that the model folder has none.
 */
import { NodeHttpServer } from "@effect/platform-node"
import { Effect, Exit, Layer, Schema, SchemaIssue, Semaphore } from "effect"
import { HttpRouter, HttpServerRequest, HttpServerResponse } from "effect/http"
import { createServer } from "node:http"
import * as Generate from "../model/Generate.ts"
import type * as Model from "../model/Model.ts"
import type * as Tokenizer from "../io/Tokenizer.ts"

export interface Served {
  readonly model: Model.Model
  /** Undefined for a model folder without one: token-id prompts only. */
  readonly tokenizer: Tokenizer.Tokenizer | undefined
  /** The name clients give as `model`, and `/v1/models` lists. */
  readonly name: string
  /** The largest `logprobs` / `prompt_logprobs` / `top_logprobs` a request may ask for (vLLM's --max-logprobs, 20 by default). */
  readonly maxLogprobs?: number
}

/**
 * Serves the API on `host`:`port` (0: a free port; the `HttpServer` service says which), logging a
 * line per request unless `logRequests` is false (a server inside a pipeline would bury its output).
 */
export const layer = (served: Served, options: { readonly host: string; readonly port: number; readonly logRequests?: boolean }) =>
  HttpRouter.serve(routes(served), { disableLogger: true, disableListenLog: true, middleware: options.logRequests === false ? undefined : logRequest }).pipe(
    Layer.provideMerge(NodeHttpServer.layer(createServer, { host: options.host, port: options.port }))
  )

/** vLLM's default cap on `logprobs` and `prompt_logprobs`. */
const DEFAULT_MAX_LOGPROBS = 20
/** OpenAI's default `max_tokens` for completions. */
const DEFAULT_MAX_TOKENS = 16

class ApiError extends Schema.TaggedError<ApiError>()("ApiError", {
  status: Schema.Number,
  message: Schema.String,
  type: Schema.String,
  param: Schema.NullOr(Schema.String),
  code: Schema.NullOr(Schema.String)
}) {}

const invalid = (message: string, param: string | null = null, code: string | null = null) =>
  new ApiError({ status: 400, type: "invalid_request_error", message, param, code })

const errorResponse = (error: ApiError) =>
  HttpServerResponse.jsonUnsafe(
    { error: { message: error.message, type: error.type, param: error.param, code: error.code } },
    { status: error.status }
  )

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
  n: Optional(Schema.Int),
  stream: Optional(Schema.Boolean)
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
    content: Schema.Union([Schema.String, Schema.Array(Schema.Struct({ type: Schema.Literal("text"), text: Schema.String }))])
  })).check(Schema.isMinLength(1)),
  max_completion_tokens: Optional(Count),
  logprobs: Optional(Schema.Boolean),
  top_logprobs: Optional(TopCount)
})

const routes = (served: Served) =>
  HttpRouter.use(Effect.fnUntraced(function*(router) {
    const api = makeApi(served, yield* Semaphore.make(1))
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

/** Answers with the JSON a handler returns, or with the error it failed or died with. */
const handle = <R>(handler: Effect.Effect<unknown, ApiError, R>) =>
  handler.pipe(
    Effect.map((json) => HttpServerResponse.jsonUnsafe(json)),
    Effect.catchTag("ApiError", (error) => Effect.succeed(errorResponse(error))),
    Effect.catchDefect((defect) =>
      Effect.logError("request failed", defect).pipe(
        Effect.as(errorResponse(
          new ApiError({
            status: 500,
            type: "server_error",
            message: `The server failed while processing the request: ${defect instanceof Error ? defect.message : String(defect)}`,
            param: null,
            code: null
          })
        ))
      )
    )
  )

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

/** The endpoints' work over the served model; `semaphore` serialises model work. */
const makeApi = ({ model, tokenizer, name, maxLogprobs: maxCount }: Served, semaphore: Semaphore.Semaphore) => {
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
    if (request.stream === true) return Effect.fail(invalid("Streaming is not supported by this server.", "stream"))
    if (request.n != null && request.n !== 1) return Effect.fail(invalid("Only n = 1 is supported.", "n"))
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

  /** Runs Generate with the request's sampling fields, one request at a time. */
  const generate = (
    prompts: ReadonlyArray<ReadonlyArray<number>>,
    request: CompletionRequest | ChatRequest,
    options: Pick<Generate.Options, "maxNewTokens" | "topLogprobs" | "promptLogprobs">
  ) =>
    Generate.generate(model, prompts, {
      ...options,
      temperature: request.temperature ?? 1,
      topP: request.top_p ?? 1,
      seed: request.seed ?? undefined,
      stopTokenIds,
      stopStrings: typeof request.stop === "string" ? [request.stop] : request.stop ?? [],
      decode: tokenizer && ((ids) => tokenizer.decode(ids, { skipSpecialTokens: true })),
      batchSize: 8
    }).pipe(semaphore.withPermits(1))

  /** A token's text: the token decoded alone, special tokens included (vLLM's `decoded_token`); null without a tokenizer. */
  const tokenText = (token: number) => tokenizer?.decode([token]) ?? null
  /** A token as the legacy `logprobs` name it: its text, or `token_id:ID` without a tokenizer. */
  const tokenName = (token: number) => tokenText(token) ?? `token_id:${token}`

  /** OpenAI's legacy `logprobs`: the token itself and the top n per position; null where unscored. */
  const legacyLogprobs = (entries: ReadonlyArray<{ token: number; scored: Generate.TokenLogprob | undefined }>, n: number) => {
    const tokens = entries.map(({ token }) => tokenName(token))
    let offset = 0
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
    for (const { ids } of inputs) yield* checkPrompt(ids, maxTokens)
    const echo = request.echo === true
    if (echo && tokenizer === undefined) return yield* withoutTokenizer("the prompt cannot be echoed as text", "echo")
    const topLogprobs = request.logprobs ?? undefined
    // Echoed log-probs need the prompt scored as well, as in vLLM.
    const promptTop = [request.prompt_logprobs, echo ? topLogprobs : undefined].filter((k) => k != null)
    const generations = yield* generate(inputs.map(({ ids }) => ids), request, {
      maxNewTokens: maxTokens,
      topLogprobs,
      promptLogprobs: promptTop.length === 0 ? undefined : Math.max(...promptTop)
    })
    const choices = generations.map((generation, index) => {
      const prompt = inputs[index]
      const scored = [
        ...(echo ? prompt.ids.map((token, i) => ({ token, scored: generation.promptLogprobs?.[i] })) : []),
        ...generation.logprobs.map((scored) => ({ token: scored.token, scored }))
      ]
      return {
        index,
        text: (echo ? prompt.text ?? tokenizer?.decode(prompt.ids) : "") + (generation.text ?? ""),
        logprobs: topLogprobs === undefined ? null : legacyLogprobs(scored, topLogprobs),
        finish_reason: generation.finishReason,
        stop_reason: typeof generation.stopReason === "string" ? generation.stopReason : null,
        prompt_logprobs: request.prompt_logprobs == null ? null : promptLogprobs(generation.promptLogprobs ?? [], request.prompt_logprobs)
      }
    })
    return {
      id: `cmpl-${crypto.randomUUID()}`,
      object: "text_completion",
      created: now(),
      model: name,
      choices,
      usage: usage(inputs.map(({ ids }) => ids), generations)
    }
  })

  const chat = Effect.fnUntraced(function*(request: ChatRequest) {
    yield* checkCommon(request)
    if (request.top_logprobs != null && request.top_logprobs > 0 && request.logprobs !== true) {
      return yield* invalid("top_logprobs requires logprobs to be true.", "top_logprobs")
    }
    if (tokenizer === undefined) {
      return yield* withoutTokenizer("it has no chat template: send token-id prompts to /v1/completions", "messages")
    }
    const messages = request.messages.map(({ role, content }) => ({
      role,
      content: typeof content === "string" ? content : content.map((part) => part.text).join("")
    }))
    const text = yield* tokenizer.applyChatTemplate(messages, { addGenerationPrompt: true }).pipe(
      Effect.mapError((error) => invalid(error.message, "messages"))
    )
    // The template holds the special tokens (BOS) itself, so none are added, as in transformers and vLLM.
    const ids = tokenizer.encode(text, { addSpecialTokens: false })
    const maxTokens = request.max_completion_tokens ?? request.max_tokens ?? Math.max(0, maxPositionEmbeddings - ids.length)
    yield* checkPrompt(ids, maxTokens)
    const topLogprobs = request.logprobs === true ? request.top_logprobs ?? 0 : undefined
    const [generation] = yield* generate([ids], request, { maxNewTokens: maxTokens, topLogprobs })
    return {
      id: `chatcmpl-${crypto.randomUUID()}`,
      object: "chat.completion",
      created: now(),
      model: name,
      choices: [{
        index: 0,
        message: { role: "assistant", content: generation.text ?? "" },
        logprobs: topLogprobs === undefined ? null : { content: chatLogprobs(generation.logprobs, topLogprobs) },
        finish_reason: generation.finishReason,
        stop_reason: typeof generation.stopReason === "string" ? generation.stopReason : null
      }],
      usage: usage([ids], [generation])
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

const usage = (prompts: ReadonlyArray<ReadonlyArray<number>>, generations: ReadonlyArray<Generate.Generation>) => {
  const promptTokens = prompts.reduce((sum, ids) => sum + ids.length, 0)
  const completionTokens = generations.reduce((sum, generation) => sum + generation.tokens.length, 0)
  return { prompt_tokens: promptTokens, completion_tokens: completionTokens, total_tokens: promptTokens + completionTokens }
}

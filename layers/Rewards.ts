/**
 * The sources of rewards, as layers of the `Rewards` service (src/rewards/Reward.ts):
 *
 * - `layer(options)`: every kind of task: numeric answers, formats and code checked here
 *   (src/rewards/Verifiers.ts, src/rewards/CodeRunner.ts), rubrics by the judge of `options.judge`.
 * - `judge(options)`: rubrics only, by an LLM judge over the OpenAI-compatible chat API.
 *
 * A judge that cannot reach a verdict on an item (it timed out, kept failing, or answered neither
 * yes nor no, after its retries) leaves that item undecided, with the reason: the reward is the
 * share of decided items satisfied, so a failure of the judge never counts against the response.
 */
import { createHash } from "node:crypto"
import * as fs from "node:fs/promises"
import { availableParallelism } from "node:os"
import * as path from "node:path"
import { Cause, Duration, Effect, Layer, Schedule, Schema, Semaphore } from "effect"
import { FetchHttpClient, HttpClient, HttpClientError, HttpClientRequest } from "effect/http"
import * as CodeRunner from "../src/rewards/CodeRunner.ts"
import { splitThinking } from "../src/model/Generate.ts"
import { RewardError, Rewards, type Sample, type Score } from "../src/rewards/Reward.ts"
import * as Verifiers from "../src/rewards/Verifiers.ts"

type Scorer = (sample: Sample) => Effect.Effect<Score, RewardError>

// ---------------------------------------------------------------------------------------------
// Verifiers

export interface CodeOptions extends Partial<CodeRunner.Limits> {
  /** Workers running at once, over all samples (default: the CPUs). */
  readonly concurrency?: number | undefined
}

const makeVerifiers = Effect.fnUntraced(function*(options: CodeOptions) {
  const { concurrency = availableParallelism(), timeoutMs = CodeRunner.defaultLimits.timeoutMs, memoryMb = CodeRunner.defaultLimits.memoryMb } = options
  if (!(Number.isInteger(concurrency) && concurrency >= 1)) {
    return yield* new RewardError({ source: "code", reason: `concurrency ${concurrency} is not a positive integer` })
  }
  const workers = yield* Semaphore.make(concurrency)
  return (({ response, task }) => {
    switch (task.kind) {
      case "numeric": {
        const expected = Verifiers.lastNumber(task.answer)
        return expected === undefined
          ? Effect.fail(new RewardError({ source: "numeric", reason: `the expected answer ${JSON.stringify(task.answer)} is not a number` }))
          : Effect.succeed(Verifiers.numeric(response, expected.value))
      }
      case "exact":
        return Effect.succeed(Verifiers.exact(response, task.answer))
      case "format":
        return Effect.try({
          try: () => new RegExp(task.pattern),
          catch: (error) => new RewardError({ source: "format", reason: `the pattern is not a regular expression: ${String(error)}` })
        }).pipe(Effect.map((pattern) => Verifiers.format(response, pattern)))
      case "code":
        return workers.withPermit(CodeRunner.run(Verifiers.code(response), task.entry, task.tests, { timeoutMs, memoryMb })).pipe(
          Effect.map(Verifiers.shareOf)
        )
      case "rubric":
        return Effect.fail(new RewardError({ source: "rubric", reason: "no judge is configured to check rubrics" }))
    }
  }) satisfies Scorer
})

// ---------------------------------------------------------------------------------------------
// Judge

export interface JudgeOptions {
  /** Servers with the OpenAI chat API (vLLM, `cascade serve`), without `/v1`; tries take turns. */
  readonly urls: ReadonlyArray<string>
  /** The `model` field of requests: the name the server serves. */
  readonly model?: string | undefined
  /** Where verdicts are kept (verdicts.jsonl), so that a rerun replays them; none: not kept. */
  readonly cacheDir?: string | undefined
  /** Requests in flight at once, over all samples and items (default 8). */
  readonly concurrency?: number | undefined
  /** Further tries of an item after a 429, a 5xx, a failed connection, a timeout or an unreadable answer (default 3). */
  readonly retries?: number | undefined
  /** Per try, for the whole answer (default 1 minute). */
  readonly timeout?: Duration.Input | undefined
  /** First wait before a retry, doubling each time, jittered (default 1 second). */
  readonly backoff?: Duration.Input | undefined
  /** Room for the answer (default 16 tokens; more for a judge that thinks before it answers). */
  readonly maxTokens?: number | undefined
}

/** The judge's answer, or the server's, could not be read as a verdict. */
class Unreadable extends Schema.TaggedError<Unreadable>()("Unreadable", { reason: Schema.String }) {}

const ChatCompletion = Schema.Struct({
  choices: Schema.NonEmptyArray(Schema.Struct({ message: Schema.Struct({ content: Schema.NullOr(Schema.String) }) }))
})
const decodeCompletion = Schema.decodeUnknownEffect(ChatCompletion)

/**
 * After an answer that is neither yes nor no, the next tries sample: a greedy judge would give the
 * same answer again. Other failures keep the greedy verdict, the one a rerun would get.
 */
const RESAMPLING_TEMPERATURE = 0.7

/**
 * The question the judge gets about one item, the response's thinking stripped; exported so that
 * data for training a judge asks it the same way.
 */
export const judgeQuestion = (prompt: string, response: string, item: string) =>
  [
    "Here is a prompt and a response to it.",
    "",
    "Prompt:",
    prompt,
    "",
    "Response:",
    response,
    "",
    `Does the response satisfy: ${item.trim().replace(/[.?!]+$/, "")}? Answer yes or no.`
  ].join("\n")

/**
 * Verdicts by the hash of what decides them, appended to `dir`/verdicts.jsonl one line each, so that
 * a run that stops loses at most the line it was writing (skipped when read back). Only verdicts
 * are kept: an item the judge failed on is asked again by the next run.
 */
const openCache = Effect.fnUntraced(function*(dir: string) {
  const file = path.join(dir, "verdicts.jsonl")
  const fail = (cause: unknown) => new RewardError({ source: `judge cache ${file}`, reason: String(cause) })
  const text = yield* Effect.tryPromise({
    try: async () => {
      await fs.mkdir(dir, { recursive: true })
      const text = await fs.readFile(file, "utf8").catch((error: NodeJS.ErrnoException) => {
        if (error.code === "ENOENT") return ""
        throw error
      })
      // A line cut short must not swallow the next one.
      if (text !== "" && !text.endsWith("\n")) await fs.appendFile(file, "\n")
      return text
    },
    catch: fail
  })
  const verdicts = new Map<string, boolean>()
  for (const line of text.split("\n")) {
    try {
      const { key, passed } = JSON.parse(line) as { key?: unknown; passed?: unknown }
      if (typeof key === "string" && typeof passed === "boolean") verdicts.set(key, passed)
    } catch {
      // an empty line, or one cut short
    }
  }
  return {
    get: (key: string) => verdicts.get(key),
    put: (key: string, item: string, passed: boolean) => {
      verdicts.set(key, passed)
      // One write per line, appended: lines of concurrent writers do not interleave.
      return Effect.tryPromise({ try: () => fs.appendFile(file, `${JSON.stringify({ key, passed, item })}\n`), catch: fail })
    }
  }
})

/** Worth another try: the server may answer next time. Not another 4xx, nor a request that cannot be sent. */
const retryable = (error: unknown) =>
  error instanceof Unreadable ||
  HttpClient.isTransientError(error) ||
  (HttpClientError.isHttpClientError(error) && error.reason._tag === "DecodeError") // a body cut short, or not JSON

const reasonOf = (error: unknown, timeout: Duration.Input) =>
  Cause.isTimeoutError(error)
    ? `no answer within ${Duration.format(Duration.fromInputUnsafe(timeout))}`
    : error instanceof Unreadable
    ? error.reason
    : error instanceof Error
    ? error.message
    : String(error)

/**
 * Asks the judge about each item of a rubric, one chat completion per item at temperature 0:
 * "Does the response satisfy: <item>? Answer yes or no." over the prompt and the response without
 * its thinking. Verdicts come from `Verifiers.verdict`; a 429, a 5xx, a failed connection, a
 * timeout, a body cut short or an answer that is neither yes nor no is tried again after an
 * exponential backoff, up to `retries` times; an item that gets no verdict is undecided, with the
 * last failure as its note. Items start at the servers in turn, and each retry goes to the next one.
 */
const makeJudge = Effect.fnUntraced(function*(options: JudgeOptions) {
  const client = (yield* HttpClient.HttpClient).pipe(HttpClient.filterStatusOk)
  const endpoints = options.urls.map((url) => url.replace(/\/+$/, ""))
  const source = `judge ${endpoints.join(", ")}`
  const { concurrency = 8, retries = 3, timeout = "1 minute", backoff = "1 second", maxTokens = 16 } = options
  if (endpoints.length === 0) return yield* new RewardError({ source, reason: "no judge URL given" })
  if (![concurrency, maxTokens].every((n) => Number.isInteger(n) && n >= 1) || !(Number.isInteger(retries) && retries >= 0)) {
    return yield* new RewardError({ source, reason: "concurrency and maxTokens must be positive integers, retries a non-negative one" })
  }
  const cache = options.cacheDir === undefined ? undefined : yield* openCache(options.cacheDir)
  // The server's name for its model says who judged; without one, the servers do.
  const judgeIdentity = options.model ?? endpoints.join(" ")
  const requests = yield* Semaphore.make(concurrency)
  const retrying = Schedule.exponential(backoff).pipe(Schedule.jittered)
  let turn = 0

  /** One try at `endpoint`: the verdict on the question in `content`. */
  const ask = (endpoint: string, content: string, temperature: number) => {
    const request = HttpClientRequest.post(`${endpoint}/v1/chat/completions`).pipe(
      HttpClientRequest.bodyJsonUnsafe({
        ...(options.model === undefined ? {} : { model: options.model }),
        messages: [{ role: "user", content }],
        max_tokens: maxTokens,
        temperature
      })
    )
    return client.execute(request).pipe(
      Effect.flatMap((response) => response.json),
      Effect.timeout(timeout),
      Effect.flatMap((json) => Effect.mapError(decodeCompletion(json), () => new Unreadable({ reason: "the answer is not a chat completion" }))),
      Effect.flatMap(({ choices: [{ message }] }) => {
        const passed = Verifiers.verdict(message.content ?? "")
        if (passed !== undefined) return Effect.succeed(passed)
        const shown = (message.content ?? "").slice(0, 100)
        return Effect.fail(new Unreadable({ reason: `the judge answered ${JSON.stringify(shown)}, neither yes nor no` }))
      }),
      requests.withPermit // not held while waiting to retry
    )
  }

  const check = (prompt: string, response: string, item: string): Effect.Effect<Score["checks"][number], RewardError> => {
    const content = judgeQuestion(prompt, response, item)
    const key = createHash("sha256").update(JSON.stringify({ judge: judgeIdentity, content })).digest("hex")
    const cached = cache?.get(key)
    if (cached !== undefined) return Effect.succeed({ name: item, passed: cached })
    const first = turn++
    let attempts = 0
    let temperature = 0
    return Effect.suspend(() => ask(endpoints[(first + attempts++) % endpoints.length], content, temperature)).pipe(
      Effect.tapError((error) =>
        Effect.sync(() => {
          if (error instanceof Unreadable) temperature = RESAMPLING_TEMPERATURE
        })
      ),
      Effect.retry({ schedule: retrying, times: retries, while: retryable }),
      Effect.matchEffect({
        onFailure: (error) =>
          Effect.succeed({ name: item, passed: undefined, note: `${reasonOf(error, timeout)}${attempts > 1 ? ` (after ${attempts} tries)` : ""}` }),
        onSuccess: (passed) => (cache === undefined ? Effect.void : cache.put(key, item, passed)).pipe(Effect.as({ name: item, passed }))
      })
    )
  }

  const score: Scorer = ({ prompt, response, task }) => {
    if (task.kind !== "rubric") return Effect.fail(new RewardError({ source, reason: `the judge checks rubrics, not ${task.kind} tasks` }))
    if (task.items.length === 0) return Effect.fail(new RewardError({ source, reason: "the rubric has no items" }))
    const { answer } = splitThinking(response)
    return Effect.forEach(task.items, (item) => check(prompt, answer.trim(), item), { concurrency: "unbounded" }).pipe(
      Effect.map(Verifiers.shareOf)
    )
  }
  return { score, describe: `judge ${judgeIdentity} (${maxTokens} tokens to answer)` }
})

// ---------------------------------------------------------------------------------------------
// Layers

/** Rubrics only, by the judge. */
export const judge = (options: JudgeOptions) =>
  Layer.effect(Rewards, Effect.map(makeJudge(options), ({ score, describe }) => Rewards.of({ score, describe }))).pipe(
    Layer.provide(FetchHttpClient.layer)
  )

/** Every kind of task: rubrics by the judge (none: a rubric task fails), the others checked here. */
export const layer = (options: { readonly judge?: JudgeOptions | undefined; readonly code?: CodeOptions | undefined } = {}) =>
  Layer.effect(
    Rewards,
    Effect.gen(function*() {
      const verify = yield* makeVerifiers(options.code ?? {})
      const rubric = options.judge === undefined ? undefined : yield* makeJudge(options.judge)
      const { timeoutMs = CodeRunner.defaultLimits.timeoutMs, memoryMb = CodeRunner.defaultLimits.memoryMb } = options.code ?? {}
      const verifiers = `verifiers (code: ${timeoutMs} ms, ${memoryMb} MB)`
      return Rewards.of({
        score: (sample) => (sample.task.kind === "rubric" && rubric !== undefined ? rubric.score(sample) : verify(sample)),
        describe: rubric === undefined ? verifiers : `${verifiers}, ${rubric.describe}`
      })
    })
  ).pipe(Layer.provide(FetchHttpClient.layer))

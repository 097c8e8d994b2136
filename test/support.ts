/** Shared helpers of the test suite: fixture paths, references, comparisons. */
import * as tf from "@tensorflow/tfjs"
import { Effect } from "effect"
import { execFile } from "node:child_process"
import { createServer } from "node:http"
import * as fs from "node:fs/promises"
import * as os from "node:os"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import { type BackendName, TensorBackend } from "../layers/TensorBackend.ts"

/** The read-only fixtures made with transformers, in ../shared beside the repository. */
export const sharedFixture = (name: string) => fileURLToPath(new URL(`../../shared/fixtures/${name}`, import.meta.url))

/** Fixtures this repository keeps (made by scripts/make_references.py). */
export const localFixture = (name: string) => fileURLToPath(new URL(`./fixtures/${name}`, import.meta.url))

const cliMain = fileURLToPath(new URL("../src/cli/main.ts", import.meta.url))

/** Runs the command line as a user would, within `timeoutMs`; never fails, returns what happened. */
export const cascadeCli = (args: ReadonlyArray<string>, timeoutMs = 60_000) =>
  Effect.callback<{ code: number; stdout: string; stderr: string }>((resume) => {
    execFile(process.execPath, [cliMain, ...args], { timeout: timeoutMs, maxBuffer: 16 * 1024 * 1024 }, (error, stdout, stderr) => {
      resume(Effect.succeed({ code: error ? (typeof error.code === "number" ? error.code : 1) : 0, stdout, stderr }))
    })
  })

import { take } from "../src/io/Reference.ts"

export { maxAbsDiff, take } from "../src/io/Reference.ts"

/** Runs a test on a backend; the test's own resources (models) are released before the backend is. */
export const onBackend = (backend: BackendName) => <A, E, R>(effect: Effect.Effect<A, E, R>) =>
  effect.pipe(Effect.scoped, Effect.provide(TensorBackend.layer(backend)))

/** A fresh temporary folder, removed with everything in it when the test's scope closes. */
export const tempDir = Effect.acquireRelease(
  Effect.promise(() => fs.mkdtemp(path.join(os.tmpdir(), "cascade-test-"))),
  (dir) => Effect.promise(() => fs.rm(dir, { recursive: true, force: true }))
)

/**
 * A JSONL file of `{"input_ids"}` rows from a seeded Markov chain over the fixture's 512 ids: mostly
 * a fixed successor, sometimes a random one, so a model's predictions carry information.
 */
export const markovData = (file: string, rows: number, length: number, seed: number) => {
  let state = seed
  const next = () => (state = (state * 1103515245 + 12345) % 2147483648) % 512
  const lines = Array.from({ length: rows }, () => {
    const ids = [next()]
    while (ids.length < length) ids.push(next() % 4 === 0 ? next() : (ids[ids.length - 1] * 7 + 3) % 512)
    return JSON.stringify({ input_ids: ids })
  })
  return Effect.promise(() => fs.writeFile(file, lines.join("\n") + "\n")).pipe(Effect.as(file))
}

/**
 * `data.jsonl` in `dir`: five rows of token ids from a fixed LCG, of lengths 30, 17, 45, 9 and 22
 * (packed by 16: 8 rows, the last with 11 real tokens). Returns the file's path.
 */
export const lcgData = (dir: string) => {
  let state = 3
  const lines = [30, 17, 45, 9, 22].map((length) =>
    JSON.stringify({
      input_ids: Array.from({ length }, () => {
        state = (state * 1103515245 + 12345) % 2147483648
        return state % 512
      })
    })
  )
  const file = path.join(dir, "data.jsonl")
  return Effect.promise(() => fs.writeFile(file, lines.join("\n") + "\n")).pipe(Effect.as(file))
}

/** The words of a text, lower-cased, of at least four letters or digits. */
const words = (text: string) => new Set((text.toLowerCase().match(/[\p{L}\p{N}]{4,}/gu) ?? []))

/** The response and the item of a judge question (as layers/Rewards.ts's `judgeQuestion` asks it). */
const RUBRIC_QUESTION = /\nResponse:\n([\s\S]*)\n\nDoes the response satisfy: ([\s\S]*)\? Answer yes or no\.$/

/**
 * A rubric item's verdict by rules a simple grader could apply: an empty response satisfies
 * nothing; "does not repeat itself" holds when no word comes twice, "answers in full sentences"
 * when the response starts with a capital and ends with a full stop; any other item when the
 * response has a word of the item's (the fact it names).
 */
export const ruleVerdict = (response: string, item: string) => {
  const text = response.trim()
  if (text === "") return false
  if (item === "does not repeat itself") {
    const all = text.toLowerCase().match(/[\p{L}\p{N}]+/gu) ?? []
    return new Set(all).size === all.length
  }
  if (item === "answers in full sentences") return /^\p{Lu}/u.test(text) && /[.!?]$/.test(text)
  const responseWords = words(text)
  return [...words(item)].some((word) => responseWords.has(word))
}

/**
 * A stand-in for an external judge service: an OpenAI-compatible chat server on a free loopback
 * port that answers each rubric question "Yes." or "No." by `ruleVerdict`. Every verdict it gives
 * is logged; closed with the scope.
 */
export const standInJudge = Effect.acquireRelease(
  Effect.promise(() => {
    const verdicts: Array<{ readonly response: string; readonly item: string; readonly passed: boolean }> = []
    const server = createServer((request, response) => {
      const chunks: Array<Buffer> = []
      request.on("data", (chunk: Buffer) => chunks.push(chunk)).on("end", () => {
        const { messages } = JSON.parse(Buffer.concat(chunks).toString()) as { messages: Array<{ content: string }> }
        const match = RUBRIC_QUESTION.exec(messages[0].content)
        if (match === null) {
          response.writeHead(400, { "content-type": "application/json" })
          return response.end(JSON.stringify({ error: { message: "not a rubric question" } }))
        }
        const passed = ruleVerdict(match[1], match[2])
        verdicts.push({ response: match[1], item: match[2], passed })
        const message = { role: "assistant", content: passed ? "Yes." : "No." }
        response.writeHead(200, { "content-type": "application/json" })
        response.end(JSON.stringify({ object: "chat.completion", choices: [{ index: 0, message, finish_reason: "stop" }] }))
      })
    })
    return new Promise<{ readonly url: string; readonly verdicts: typeof verdicts; readonly close: () => Promise<void> }>((resolve) =>
      server.listen(0, "127.0.0.1", () =>
        resolve({
          url: `http://127.0.0.1:${(server.address() as { port: number }).port}`,
          verdicts,
          close: () => new Promise((closed) => server.close(() => closed()))
        }))
    )
  }),
  (judge) => Effect.promise(judge.close)
)

/**
 * Keeps an objective's metric tensors past the tidy of a gradient tape (`tf.valueAndGrads`), which
 * would dispose them; read them afterwards with `readMetrics`.
 */
export const keepMetrics = <M extends Readonly<Record<string, tf.Scalar | undefined>>>(metrics: M): M => {
  for (const metric of Object.values(metrics)) if (metric !== undefined) tf.keep(metric)
  return metrics
}

/** The values of metric tensors, disposing them (synchronous: CPU backends only). */
export const readMetrics = <M extends Readonly<Record<string, tf.Scalar | undefined>>>(metrics: M): { [K in keyof M]: M[K] extends tf.Scalar ? number : number | undefined } =>
  Object.fromEntries(Object.entries(metrics).map(([name, metric]) => [name, metric === undefined ? undefined : take(metric)[0]])) as never

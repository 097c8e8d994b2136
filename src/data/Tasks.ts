/**
 * Exact-match tasks: JSONL files whose lines are `{"prompt": "...", "answer": "..."}`, such as the
 * embedded default's `data/eval-recall.jsonl` (recall of facts the training text states) and
 * `data/eval-arith.jsonl` (additions and subtractions never seen in training).
 *
 * A task is scored on the model's continuation of its prompt: the predicted answer is that text up to
 * its first newline (or end-of-sequence token), with whitespace collapsed; it must equal the answer,
 * normalised the same way. Generation is passed in, so that any decoder (greedy or not, any backend)
 * can be scored, and the scorer can be tested with a plain function.
 */
import { Effect, Schema, Stream } from "effect"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import { lines } from "./Dataset.ts"
import { DataError } from "../Errors.ts"

export interface Task {
  /** 1-based line of the file it came from (0 for tasks built in code). */
  readonly line: number
  readonly prompt: string
  readonly answer: string
  /** Image files (absolute paths) for the prompt's image placeholders, in order: a question about pictures. */
  readonly images?: ReadonlyArray<string>
}

/** The evaluation files of the embedded default, shipped in the package's data/ folder. */
export const embedded = {
  recall: fileURLToPath(new URL("../../data/eval-recall.jsonl", import.meta.url)),
  arith: fileURLToPath(new URL("../../data/eval-arith.jsonl", import.meta.url))
} as const

const Record = Schema.Struct({ prompt: Schema.String, answer: Schema.String, images: Schema.optional(Schema.Array(Schema.String)) })
const decodeRecord = Schema.decodeUnknownEffect(Record)

/**
 * The tasks of a `{"prompt","answer"}` JSONL file, in order (the first `limit` when given). A line
 * that is not such an object, or an empty prompt or answer, fails with a DataError naming the file
 * and line; so does a file with no task.
 */
export const read = Effect.fn("Tasks.read")(function*(file: string, options: { readonly limit?: number } = {}) {
  const limit = options.limit ?? Infinity
  const tasks = yield* lines(file).pipe(
    limit === Infinity ? (s) => s : Stream.take(Math.max(0, limit)),
    Stream.mapEffect(({ line, text }) =>
      Effect.gen(function*() {
        const json = yield* Effect.try({
          try: () => JSON.parse(text) as unknown,
          catch: () => new DataError({ file, line, reason: "is not valid JSON" })
        })
        const record = yield* decodeRecord(json).pipe(
          Effect.mapError(() => new DataError({ file, line, reason: `expected {"prompt": string, "answer": string}, with optional "images": [files]` }))
        )
        if (record.prompt.length === 0) return yield* new DataError({ file, line, reason: "has an empty prompt" })
        if (normalise(record.answer) === "") return yield* new DataError({ file, line, reason: "has an empty answer" })
        const images = record.images?.map((image) => path.resolve(path.dirname(file), image))
        return { line, prompt: record.prompt, answer: record.answer, ...(images === undefined ? {} : { images }) } satisfies Task
      })
    ),
    Stream.runCollect
  )
  if (tasks.length === 0 && limit !== 0) return yield* new DataError({ file, reason: "holds no task" })
  return tasks
})

/** Collapses runs of whitespace to one space and trims the ends. */
export const normalise = (text: string): string => text.split(/\s+/).filter((word) => word !== "").join(" ")

/** What marks the end of an answer in a continuation. */
export const defaultStops: ReadonlyArray<string> = ["\n", "</s>"]

/** The answer a continuation gives: its text before the first stop (newline, EOS), normalised. */
export const extractAnswer = (continuation: string, stops: ReadonlyArray<string> = defaultStops): string => {
  let end = continuation.length
  for (const stop of stops) {
    const at = continuation.indexOf(stop)
    if (at !== -1 && at < end) end = at
  }
  return normalise(continuation.slice(0, end))
}

export interface Scored {
  readonly task: Task
  /** The continuation as generated. */
  readonly continuation: string
  /** The answer read from it. */
  readonly predicted: string
  readonly correct: boolean
}

export interface Score {
  readonly correct: number
  readonly total: number
  /** correct / total (0 for no task). */
  readonly accuracy: number
  readonly items: ReadonlyArray<Scored>
}

export interface ScoreOptions {
  /** Prompts handed to `generate` at a time. Default: all at once. */
  readonly batchSize?: number
  /** Strings that end an answer. Default: newline and `</s>`. */
  readonly stops?: ReadonlyArray<string>
}

/** Generates continuations of prompts, one per prompt, in order; the tasks they are of come along (their images). */
export type Generator<E, R> = (prompts: Array<string>, tasks: ReadonlyArray<Task>) => Effect.Effect<ReadonlyArray<string>, E, R>

/**
 * Scores tasks by exact match of the answer read from each continuation. A generator that returns a
 * different number of continuations than it was given prompts is a defect.
 */
export const score = <E, R>(
  tasks: ReadonlyArray<Task>,
  generate: Generator<E, R>,
  options: ScoreOptions = {}
): Effect.Effect<Score, E, R> =>
  Effect.gen(function*() {
    const size = Math.max(1, options.batchSize ?? tasks.length)
    const items: Array<Scored> = []
    for (let first = 0; first < tasks.length; first += size) {
      const batch = tasks.slice(first, first + size)
      const continuations = yield* generate(batch.map((task) => task.prompt), batch)
      if (continuations.length !== batch.length) {
        return yield* Effect.die(
          new Error(`Tasks.score: the generator returned ${continuations.length} continuations for ${batch.length} prompts`)
        )
      }
      batch.forEach((task, i) => {
        const predicted = extractAnswer(continuations[i], options.stops)
        items.push({ task, continuation: continuations[i], predicted, correct: predicted === normalise(task.answer) })
      })
    }
    const correct = items.filter((item) => item.correct).length
    return { correct, total: items.length, accuracy: items.length === 0 ? 0 : correct / items.length, items }
  })

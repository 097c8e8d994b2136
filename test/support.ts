/** Shared helpers of the test suite: fixture paths, references, comparisons. */
import { Effect } from "effect"
import { execFile } from "node:child_process"
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

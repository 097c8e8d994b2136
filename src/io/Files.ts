/** Small file utilities the stages share: atomic JSON, content hashes. */
import { createHash } from "node:crypto"
import { createReadStream } from "node:fs"
import * as fs from "node:fs/promises"
import { Effect } from "effect"
import { CheckpointError } from "../Errors.ts"
import { writeAtomically } from "./Safetensors.ts"

/** Writes text to a temp file renamed over `path`. */
export const writeText = (path: string, text: string) => writeAtomically(path, (append) => append(new TextEncoder().encode(text)))

/** Writes JSON (pretty, newline-terminated) to a temp file renamed over `path`. */
export const writeJson = (path: string, value: unknown) => writeText(path, JSON.stringify(value, null, 2) + "\n")

/** Removes a file if it is there. */
export const remove = (path: string): Effect.Effect<void, CheckpointError> =>
  Effect.tryPromise({ try: () => fs.rm(path, { force: true }), catch: (cause) => new CheckpointError({ file: path, reason: `cannot be removed (${String(cause)})` }) })

/** Parsed JSON of `path`, or undefined when the file does not exist. */
export const readJsonIfPresent = (path: string): Effect.Effect<unknown, CheckpointError> =>
  Effect.tryPromise({
    try: () => fs.readFile(path, "utf8").then((text) => JSON.parse(text) as unknown, (error) => {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") return undefined
      throw error
    }),
    catch: (cause) => new CheckpointError({ file: path, reason: `cannot be read as JSON (${String(cause)})` })
  })

/** sha256 of a file's bytes, streamed. */
export const sha256 = (path: string): Effect.Effect<string, CheckpointError> =>
  Effect.tryPromise({
    try: () =>
      new Promise<string>((resolve, reject) => {
        const hash = createHash("sha256")
        createReadStream(path).on("data", (chunk) => hash.update(chunk)).on("end", () => resolve(hash.digest("hex"))).on("error", reject)
      }),
    catch: (cause) => new CheckpointError({ file: path, reason: `cannot be read (${String(cause)})` })
  })

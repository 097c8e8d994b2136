/**
 * A Markdown report that several pipelines write into: named sections, each between
 * `<!-- section NAME -->` and `<!-- /section NAME -->`. A pipeline rewrites its own section and keeps
 * the others where they stand (the cascade's retention table, then post-training's rows), so either
 * can run again in any order. Text outside the sections is not kept.
 */
import { Effect } from "effect"
import * as fs from "node:fs/promises"
import { CheckpointError } from "../Errors.ts"
import * as Files from "../io/Files.ts"

const open = (name: string) => `<!-- section ${name} -->`
const close = (name: string) => `<!-- /section ${name} -->`

/** The sections of a report, in order. */
export const sections = (text: string): Array<{ readonly name: string; readonly body: string }> =>
  [...text.matchAll(/<!-- section (\S+) -->\n([\s\S]*?)\n<!-- \/section \1 -->/g)].map((m) => ({ name: m[1], body: m[2] }))

/** `text` with section `name` (no spaces) holding `body`: in its place if it was there, else last. */
export const withSection = (text: string, name: string, body: string): string => {
  const current = sections(text)
  const next = current.some((s) => s.name === name)
    ? current.map((s) => (s.name === name ? { name, body } : s))
    : [...current, { name, body }]
  return next.map((s) => `${open(s.name)}\n${s.body.trimEnd()}\n${close(s.name)}\n`).join("\n")
}

/** Writes section `name` of the report `file` (created if missing), atomically. */
export const writeSection = Effect.fn("Report.writeSection")(function*(file: string, name: string, body: string) {
  const text = yield* Effect.tryPromise({
    try: () =>
      fs.readFile(file, "utf8").catch((error: NodeJS.ErrnoException) => {
        if (error.code === "ENOENT") return ""
        throw error
      }),
    catch: (cause) => new CheckpointError({ file, reason: `cannot be read (${String(cause)})` })
  })
  yield* Files.writeText(file, withSection(text, name, body))
})

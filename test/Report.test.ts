import { assert, describe, it } from "@effect/vitest"
import { Effect, Schema } from "effect"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import * as Report from "../src/report/Report.ts"
import { tempDir } from "./support.ts"

const Name = Schema.Literals(["cascade", "post-training", "bench"])
/** Lines of a body: Markdown, blank lines, and text that looks like the markers. */
const Lines = Schema.Array(Schema.Literals(["# Title", "| a | b |", "", "  ", "text -->", "<!-- note -->", "<!-- section x -->", "x"])).check(Schema.isMaxLength(6))

describe("Report.withSection", () => {
  it.prop("rewrites the named section in place, keeps the others in order, and is idempotent", {
    writes: Schema.Array(Schema.Tuple([Name, Lines])).check(Schema.isMaxLength(8)),
    name: Name,
    lines: Lines
  }, ({ writes, name, lines }) => {
    const body = lines.join("\n")
    const before = writes.reduce((text, [n, b]) => Report.withSection(text, n, b.join("\n")), "")
    const after = Report.withSection(before, name, body)
    const old = Report.sections(before)
    const expected = old.some((s) => s.name === name)
      ? old.map((s) => (s.name === name ? { name, body: body.trimEnd() } : s))
      : [...old, { name, body: body.trimEnd() }]
    assert.deepStrictEqual(Report.sections(after), expected)
    assert.strictEqual(Report.withSection(after, name, body), after)
  }, { arbitrary: { runs: 300 } })

  it("reads back what it wrote, markers inside a body included", () => {
    const text = Report.withSection(Report.withSection("", "cascade", "# Cascade\n\n<!-- note -->\ntext -->"), "post-training", "## Post")
    assert.deepStrictEqual(Report.sections(text), [
      { name: "cascade", body: "# Cascade\n\n<!-- note -->\ntext -->" },
      { name: "post-training", body: "## Post" }
    ])
  })
})

describe("Report.writeSection", () => {
  it.effect("creates the report, then rewrites its own section and keeps another pipeline's", () =>
    Effect.gen(function*() {
      const file = path.join(yield* tempDir, "report.md")
      yield* Report.writeSection(file, "cascade", "# Cascade report\n\n| table 1 |")
      yield* Report.writeSection(file, "post-training", "## Post-training\n\n| rows |")
      yield* Report.writeSection(file, "cascade", "# Cascade report\n\n| table 2 |")
      const text = yield* Effect.promise(() => fs.readFile(file, "utf8"))
      assert.deepStrictEqual(Report.sections(text), [
        { name: "cascade", body: "# Cascade report\n\n| table 2 |" },
        { name: "post-training", body: "## Post-training\n\n| rows |" }
      ])
      assert.isTrue(text.startsWith("<!-- section cascade -->\n# Cascade report"))
    }).pipe(Effect.scoped))
})

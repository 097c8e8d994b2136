import { assert, describe, it } from "@effect/vitest"
import { Effect, Schema, Stream } from "effect"
import * as Dataset from "../src/data/Dataset.ts"

const Documents = Schema.Array(Schema.Array(Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 99 }))).check(Schema.isMaxLength(30)))
  .check(Schema.isMaxLength(12))

describe("Dataset.pack", () => {
  it.effect.prop(
    "rows hold the documents' tokens in order, padded, with a start where each document (or a row) begins",
    { documents: Documents, length: Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 16 })) },
    ({ documents, length }) =>
      Effect.gen(function*() {
        const sequences = Stream.fromIterable(documents.map((ids, line) => ({ line: line + 1, ids })))
        const rows = yield* Stream.runCollect(sequences.pipe(Dataset.pack(length, 0)))
        const tokens = documents.flat()
        assert.deepStrictEqual(rows.flatMap((row) => row.ids.slice(0, row.length)), tokens)
        // Where each document begins in the concatenation, then in the rows.
        const begins = new Set<number>()
        let at = 0
        for (const ids of documents) {
          if (ids.length > 0) begins.add(at)
          at += ids.length
        }
        rows.forEach((row, r) => {
          assert.strictEqual(row.ids.length, length)
          assert.isTrue(row.ids.slice(row.length).every((id) => id === 0))
          const expected = Array.from({ length: row.length }, (_, i) => i).filter((i) => i === 0 || begins.has(r * length + i))
          assert.deepStrictEqual(row.starts, expected)
        })
      }),
    { arbitrary: { runs: 50 } }
  )
})

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

  it.effect.prop(
    "a document with images is never cut: it lies whole in one row, which carries its images in order",
    {
      documents: Schema.Array(Schema.Struct({ ids: Schema.Array(Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 99 }))).check(Schema.isMaxLength(16)), images: Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 2 })) }))
        .check(Schema.isMaxLength(12)),
      length: Schema.Int.check(Schema.isBetween({ minimum: 16, maximum: 24 }))
    },
    ({ documents, length }) =>
      Effect.gen(function*() {
        // An image is named by its document and place there; a document with images holds at least one token.
        const image = (d: number, i: number) => ({ height: d, width: i, pixelValues: new Float32Array(0) })
        const packable = documents.map(({ ids, images }, d) => ({
          ids: images > 0 && ids.length === 0 ? [d + 1] : ids,
          images: Array.from({ length: images }, (_, i) => image(d, i))
        }))
        const rows = yield* Stream.runCollect(Stream.fromIterable(packable).pipe(Dataset.pack(length, 0)))
        // Text comes out in order; rows are cut where a document with images would not fit.
        assert.deepStrictEqual(rows.flatMap((row) => row.ids.slice(0, row.length)), packable.flatMap(({ ids }) => ids))
        assert.deepStrictEqual(rows.flatMap((row) => row.images ?? []), packable.flatMap(({ images }) => images))
        let row = 0
        let used = 0
        for (const { ids, images } of packable) {
          if (images.length > 0 && used > 0 && used + ids.length > length) [row, used] = [row + 1, 0]
          if (images.length > 0) {
            assert.isAtMost(used + ids.length, length, "the document fits the row it begins in")
            assert.deepStrictEqual(rows[row].ids.slice(used, used + ids.length), ids)
            for (const one of images) assert.include(rows[row].images ?? [], one)
          }
          used += ids.length
          while (used >= length && used > 0) [row, used] = [row + 1, used - length]
        }
      }),
    { arbitrary: { runs: 50 } }
  )
})


/**
 * Training and evaluation data: JSONL files whose lines are `{"input_ids": [...]}` or `{"text": "..."}`
 * (with `"images": [files]` for a model that sees images: one per image placeholder, in order),
 * read as a stream so that a file of any size passes through in bounded memory. A line that cannot
 * be used fails the stream with a `DataError` naming the file and line.
 */
import { Effect, Schema, Stream } from "effect"
import { createReadStream } from "node:fs"
import { access } from "node:fs/promises"
import * as path from "node:path"
import { createInterface } from "node:readline"
import { DataError } from "../Errors.ts"
import type { Tokenizer } from "../io/Tokenizer.ts"
import type { ProcessedImage } from "./Images.ts"

export interface Line {
  /** 1-based line number in the file. */
  readonly line: number
  readonly text: string
}

/** The non-blank lines of a text file, numbered. */
export const lines = (file: string): Stream.Stream<Line, DataError> =>
  Stream.unwrap(
    Effect.tryPromise({
      try: () => access(file),
      catch: () => new DataError({ file, reason: "cannot be read (missing or not readable)" })
    }).pipe(Effect.map(() =>
      Stream.fromAsyncIterable(
        numbered(createInterface({ input: createReadStream(file, "utf8"), crlfDelay: Infinity })),
        (cause) => new DataError({ file, reason: `read failed (${String(cause)})` })
      )
    ))
  )

async function* numbered(input: AsyncIterable<string>): AsyncGenerator<Line> {
  let line = 0
  for await (const text of input) {
    line++
    if (text.trim() !== "") yield { line, text }
  }
}

/** Image files of a line, relative to the data file: one per image placeholder of its ids or text. */
const images = Schema.optional(Schema.Array(Schema.String))

const Record = Schema.Union([
  Schema.Struct({ input_ids: Schema.Array(Schema.Int.check(Schema.isGreaterThanOrEqualTo(0))), images }),
  Schema.Struct({ text: Schema.String, images })
])
const decodeRecord = Schema.decodeUnknownEffect(Record)

export interface Sequence {
  readonly line: number
  readonly ids: ReadonlyArray<number>
  /** Image files (absolute paths), in the order of their placeholders in `ids`; a Mistral 3 model's. */
  readonly imageFiles?: ReadonlyArray<string> | undefined
}

/**
 * Token sequences of a JSONL file. `{"text"}` lines need a tokenizer (with its special tokens, as
 * transformers' tokenizer adds them); every id must be below `vocabSize`.
 */
export const sequences = (
  file: string,
  options: { readonly vocabSize: number; readonly tokenizer?: Tokenizer | undefined }
): Stream.Stream<Sequence, DataError> =>
  lines(file).pipe(Stream.mapEffect(({ line, text }) =>
    Effect.gen(function*() {
      const fail = (reason: string) => Effect.fail(new DataError({ file, line, reason }))
      const json = yield* Effect.try({
        try: () => JSON.parse(text) as unknown,
        catch: () => new DataError({ file, line, reason: "is not valid JSON" })
      })
      const record = yield* decodeRecord(json).pipe(
        Effect.mapError(() =>
          new DataError({ file, line, reason: `expected {"input_ids": [non-negative integers]} or {"text": string}, with optional "images": [files]` })
        )
      )
      let ids: ReadonlyArray<number>
      if ("input_ids" in record) {
        ids = record.input_ids
      } else {
        if (options.tokenizer === undefined) return yield* fail(`has "text" but the model folder has no tokenizer.json`)
        ids = options.tokenizer.encode(record.text)
      }
      const outside = ids.find((id) => id >= options.vocabSize)
      if (outside !== undefined) return yield* fail(`token id ${outside} is outside the vocabulary (${options.vocabSize})`)
      return { line, ids, imageFiles: record.images?.map((image) => path.resolve(path.dirname(file), image)) }
    })
  ))

/**
 * A row of a packed batch: `ids` has the packing length; positions from `length` on are padding.
 * `starts` are the positions where a document begins, ascending, 0 first (a row begins a document,
 * or the rest of one the row before cut): what document masking keeps apart. `images` are the
 * images whose token grids lie in the row, in order (a Mistral 3 model's data); none when left out.
 */
export interface PackedRow {
  readonly ids: ReadonlyArray<number>
  readonly length: number
  readonly starts: ReadonlyArray<number>
  readonly images?: ReadonlyArray<ProcessedImage>
}

/**
 * Whether packed rows are document-masked unless told otherwise: each document attends only to
 * itself, with RoPE positions from 0, as if it were alone in its row. On, since it costs the
 * embedded default cascade no retention (held-out NLL lower or equal for every model, the long
 * phase's much lower; recall and arithmetic equal or better but for one recall question). A
 * teacher cache, made from whole rows, needs it off.
 */
export const documentMaskByDefault = true

/** What packing takes: token ids, and the images whose grids they hold (ImageSide.prepare). */
export interface Packable {
  readonly ids: ReadonlyArray<number>
  readonly images?: ReadonlyArray<ProcessedImage>
}

interface Pending {
  readonly ids: ReadonlyArray<number>
  readonly starts: ReadonlyArray<number>
  readonly images: ReadonlyArray<ProcessedImage>
}

const nothingPending: Pending = { ids: [], starts: [], images: [] }

/** The pending tokens as a last row, padded with `padId`. */
const paddedRow = (pending: Pending, length: number, padId: number): PackedRow => ({
  ids: pending.ids.concat(new Array(length - pending.ids.length).fill(padId)),
  length: pending.ids.length,
  starts: pending.starts,
  ...(pending.images.length > 0 ? { images: pending.images } : {})
})

/**
 * Concatenates sequences and cuts them into rows of `length` tokens; the last row is padded (with
 * `padId`) and its padding masked out. Documents may share a row, as in pretraining. A sequence
 * with images is never cut (its grids would be): it begins a new row where the current one has no
 * room for it, and must fit one (ImageSide.packable refuses longer lines).
 */
export const pack = (length: number, padId = 0) => <E, R>(sequences: Stream.Stream<Packable, E, R>) =>
  sequences.pipe(
    Stream.mapAccum(
      (): Pending => nothingPending,
      (before, { ids, images = [] }) => {
        const rows: Array<PackedRow> = []
        const noRoom = images.length > 0 && before.ids.length > 0 && before.ids.length + ids.length > length
        if (noRoom) rows.push(paddedRow(before, length, padId))
        const pending = noRoom ? nothingPending : before
        const buffer = pending.ids.concat(ids)
        const starts = ids.length === 0 ? pending.starts : [...pending.starts, pending.ids.length]
        // Every image here lies in the first row cut from the buffer: an image's sequence fits what was left of it.
        const bufferImages = pending.images.concat(images)
        let start = 0
        for (; start + length <= buffer.length; start += length) {
          const rowImages = start === 0 ? bufferImages : []
          rows.push({ ids: buffer.slice(start, start + length), length, starts: startsWithin(starts, start, start + length), ...(rowImages.length > 0 ? { images: rowImages } : {}) })
        }
        return [{ ids: buffer.slice(start), starts: startsWithin(starts, start, buffer.length), images: start === 0 ? bufferImages : [] }, rows] as const
      },
      { onHalt: (pending): ReadonlyArray<PackedRow> => (pending.ids.length === 0 ? [] : [paddedRow(pending, length, padId)]) }
    )
  )

/** The document starts in [from, to) of a buffer, relative to `from`, with 0 first. */
const startsWithin = (starts: ReadonlyArray<number>, from: number, to: number) =>
  [0, ...starts.filter((s) => s > from && s < to).map((s) => s - from)]

/** The attention mask of packed rows: 1 for tokens, 0 for padding. */
export const rowMask = (rows: ReadonlyArray<PackedRow>) =>
  rows.map((row) => Array.from({ length: row.ids.length }, (_, i) => (i < row.length ? 1 : 0)))

/**
 * How a model reads packed rows (`Model.forward`'s options): padding masked out and, with
 * `documentMask`, each document on its own.
 */
export const rowMasks = (rows: ReadonlyArray<PackedRow>, documentMask: boolean) => ({
  attentionMask: rowMask(rows),
  documentStarts: documentMask ? rows.map((row) => row.starts) : undefined
})

/**
 * Chat data for supervised fine-tuning: JSONL files whose lines are
 * `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`, rendered with the
 * tokenizer's chat template, tokenized, with the tokens the model learns to write marked: each
 * assistant turn's content and the end-of-sequence token (or whatever the template writes) that
 * closes it. The loss counts those tokens only. For a Mistral 3 model a content may be a list of
 * parts, as HF chat templates take them: `{"type": "text", "text"}` and `{"type": "image", "image":
 * file}` (relative to the data file), which the template renders as the image placeholder; each
 * placeholder is then expanded into its image's token grid (`withImages`), none of it learnt.
 *
 * Where the assistant tokens are. For each assistant turn the template renders the conversation up
 * to the turn with the generation prompt (what the model reads before it writes the turn) and up to
 * the turn included (what it has then written). Both must be prefixes of the whole conversation's
 * rendering, and their tokens prefixes of its tokens; the turn's tokens are those between the two.
 * That is what inference does too: it tokenizes the prompt alone and appends the model's tokens, so
 * requiring it means training sees the tokens inference will. Templates that render turn by turn and
 * turn boundaries at special tokens ([/INST], </s>, <|im_end|>) satisfy it; a template or tokenizer
 * that does not (rewriting earlier turns, merging tokens across a boundary) fails with a DataError
 * naming the line, rather than training on misplaced masks.
 *
 * Packing: whole conversations go into rows of `length` tokens in order, as many as fit, and the
 * rest of a row is padding. A conversation is never split across rows, so every assistant turn sees
 * its own prompt; one longer than a row is cut to the row (its tail is lost). Conversations sharing
 * a row attend to the ones before them, as documents do in pretraining packing, unless the run masks
 * documents (`PackedRow.starts` marks each conversation); each starts with its own BOS, which the
 * parent learned as a boundary.
 */
import { Effect, Schema, Stream } from "effect"
import * as path from "node:path"
import { expansion, type ImageTokenIds, type PixtralImageConfig, type ProcessedImage } from "./Images.ts"
import { lines, type PackedRow } from "./Dataset.ts"
import { DataError } from "../Errors.ts"
import type { ChatMessage, Tokenizer } from "../io/Tokenizer.ts"

export interface Chat {
  /** 1-based line in the file. */
  readonly line: number
  readonly messages: ReadonlyArray<ChatMessage>
  /** The image parts' files (absolute paths), in order. */
  readonly imageFiles?: ReadonlyArray<string>
}

const roles = ["system", "user", "assistant"]

const Part = Schema.Union([
  Schema.Struct({ type: Schema.Literal("text"), text: Schema.String }),
  Schema.Struct({ type: Schema.Literal("image"), image: Schema.String })
])
const Record = Schema.Struct({ messages: Schema.Array(Schema.Struct({ role: Schema.String, content: Schema.Union([Schema.String, Schema.Array(Part)]) })) })
const decodeRecord = Schema.decodeUnknownEffect(Record)

/** The conversations of a chat JSONL file; a line that is not one fails with a DataError naming it. */
export const read = (file: string): Stream.Stream<Chat, DataError> =>
  lines(file).pipe(Stream.mapEffect(({ line, text }) =>
    Effect.gen(function*() {
      const fail = (reason: string) => new DataError({ file, line, reason })
      const json = yield* Effect.try({ try: () => JSON.parse(text) as unknown, catch: () => fail("is not valid JSON") })
      const { messages } = yield* decodeRecord(json).pipe(
        Effect.mapError(() => fail(`expected {"messages": [{"role": string, "content": string or [{"type": "text", "text"} or {"type": "image", "image": file}]}, ...]}`))
      )
      const stranger = messages.findIndex((message) => !roles.includes(message.role))
      if (stranger !== -1) {
        return yield* fail(`message ${stranger + 1} has role "${messages[stranger].role}"; expected ${roles.join(", ")}`)
      }
      if (!messages.some((message) => message.role === "assistant")) return yield* fail("has no assistant message to learn from")
      const imageFiles = messages.flatMap((message) =>
        typeof message.content === "string" ? [] : message.content.flatMap((part) => (part.type === "image" ? [path.resolve(path.dirname(file), part.image)] : []))
      )
      return { line, messages, imageFiles }
    })
  ))

/** A tokenized conversation. */
export interface Example {
  readonly line: number
  readonly ids: ReadonlyArray<number>
  /** Per token: 1 for the tokens of assistant turns (the loss's targets), 0 for the rest. */
  readonly assistant: ReadonlyArray<number>
  /** The image parts' files, one per placeholder in `ids`, in order. */
  readonly imageFiles?: ReadonlyArray<string>
  /** The images once preprocessed and their placeholders expanded (`withImages`). */
  readonly images?: ReadonlyArray<ProcessedImage>
}

/**
 * Renders a conversation with the tokenizer's chat template, tokenizes it and marks its assistant
 * tokens. The template writes the special tokens (BOS included), so the text is tokenized without
 * adding any, as transformers' `apply_chat_template(tokenize=True)` does.
 */
export const tokenize = Effect.fn("ChatData.tokenize")(function*(tokenizer: Tokenizer, chat: Chat, file: string) {
  const fail = (reason: string) => new DataError({ file, line: chat.line, reason })
  const render = (messages: ReadonlyArray<ChatMessage>, addGenerationPrompt: boolean) =>
    tokenizer.applyChatTemplate(messages, { addGenerationPrompt }).pipe(Effect.mapError((error) => fail(error.message)))
  const encode = (text: string) => tokenizer.encode(text, { addSpecialTokens: false })

  const text = yield* render(chat.messages, false)
  const ids = encode(text)
  /** How many of the conversation's tokens the rendering of its first `count` messages makes. */
  const tokensBefore = (count: number, addGenerationPrompt: boolean) =>
    Effect.gen(function*() {
      const prefix = yield* render(chat.messages.slice(0, count), addGenerationPrompt)
      if (!text.startsWith(prefix)) {
        return yield* fail(`the chat template renders messages 1..${count} differently alone than in the whole conversation`)
      }
      const prefixIds = encode(prefix)
      if (prefixIds.some((id, i) => id !== ids[i])) {
        return yield* fail(`messages 1..${count} tokenize differently alone than in the whole conversation (tokens merge across a turn boundary)`)
      }
      return prefixIds.length
    })

  const assistant = new Array<number>(ids.length).fill(0)
  for (const [i, message] of chat.messages.entries()) {
    if (message.role !== "assistant") continue
    const start = yield* tokensBefore(i, true)
    const end = yield* tokensBefore(i + 1, false)
    if (end <= start) return yield* fail(`the chat template renders assistant message ${i + 1} as no tokens`)
    assistant.fill(1, start, end)
  }
  return { line: chat.line, ids, assistant, imageFiles: chat.imageFiles } satisfies Example
})

/**
 * The example with its images: each placeholder (`tokens.image`) expanded into its image's token
 * grid, which is input, never a target; undefined when placeholders and images do not pair up.
 */
export const withImages = (example: Example, images: ReadonlyArray<ProcessedImage>, config: PixtralImageConfig, tokens: ImageTokenIds): Example | undefined => {
  const pieces = expansion(example.ids, images, config, tokens)
  if (pieces === undefined) return undefined
  const assistant = pieces.flatMap((piece, i) => piece.map(() => (example.ids[i] === tokens.image ? 0 : example.assistant[i])))
  return { ...example, ids: pieces.flat(), assistant, images }
}

/** The tokenized conversations of a chat JSONL file. */
export const examples = (file: string, tokenizer: Tokenizer): Stream.Stream<Example, DataError> =>
  read(file).pipe(Stream.mapEffect((chat) => tokenize(tokenizer, chat, file)))

/** A packed row: `ids` has the row length, `length` tokens are real, `assistant` marks the targets (0 on padding). */
export interface Row extends PackedRow {
  readonly assistant: ReadonlyArray<number>
}

/**
 * Packs whole conversations into rows of `length` tokens in order (see the module's comment); a row
 * carries its conversations' images. A conversation with images must fit a row (the caller checks).
 */
export const pack = (examples: ReadonlyArray<Example>, length: number, padId: number): Array<Row> => {
  const rows: Array<Row> = []
  let ids: Array<number> = []
  let assistant: Array<number> = []
  let starts: Array<number> = []
  let images: Array<ProcessedImage> = []
  const flush = () => {
    if (ids.length === 0) return
    const padding = length - ids.length
    rows.push({
      ids: [...ids, ...new Array<number>(padding).fill(padId)],
      length: ids.length,
      starts,
      assistant: [...assistant, ...new Array<number>(padding).fill(0)],
      ...(images.length > 0 ? { images } : {})
    })
    ids = []
    assistant = []
    starts = []
    images = []
  }
  for (const example of examples) {
    const size = Math.min(example.ids.length, length)
    if (size === 0) continue
    if (ids.length + size > length) flush()
    starts.push(ids.length)
    ids.push(...example.ids.slice(0, size))
    assistant.push(...example.assistant.slice(0, size))
    images.push(...(example.images ?? []))
  }
  flush()
  return rows
}

/**
 * The loss positions of a row: position j predicts token j + 1 and counts when that token is an
 * assistant token (so a conversation's first token, its BOS, is never a target).
 */
export const lossMask = (row: Row): Array<number> => row.ids.map((_, j) => (j + 1 < row.length ? row.assistant[j + 1] : 0))

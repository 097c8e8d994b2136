import { assert, describe, it } from "@effect/vitest"
import { Effect, Stream } from "effect"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import * as ChatData from "../src/data/ChatData.ts"
import * as Random from "../src/Random.ts"
import * as Tokenizer from "../src/io/Tokenizer.ts"
import { tempDir } from "./support.ts"

const parentDir = fileURLToPath(new URL("../assets/parent", import.meta.url))


const writeLines = (file: string, lines: ReadonlyArray<string>) =>
  Effect.promise(() => fs.writeFile(file, lines.join("\n") + "\n")).pipe(Effect.as(file))

/** The parent's tokenizer with another chat template. */
const withTemplate = (dir: string, template: string) =>
  Effect.gen(function*() {
    yield* Effect.promise(() => fs.copyFile(path.join(parentDir, "tokenizer.json"), path.join(dir, "tokenizer.json")))
    yield* Effect.promise(() => fs.writeFile(path.join(dir, "tokenizer_config.json"), JSON.stringify({ chat_template: template })))
    return yield* Tokenizer.load(dir)
  })

/** Maximal runs of marked tokens, decoded. */
const markedSpans = (tokenizer: Tokenizer.Tokenizer, ids: ReadonlyArray<number>, marks: ReadonlyArray<number>, mark: number) => {
  const spans: Array<string> = []
  let run: Array<number> = []
  ids.forEach((id, i) => {
    if (marks[i] === mark) run.push(id)
    if ((marks[i] !== mark || i === ids.length - 1) && run.length > 0) {
      spans.push(tokenizer.decode(run))
      run = []
    }
  })
  return spans
}

const user = (content: string) => ({ role: "user", content })
const assistant = (content: string) => ({ role: "assistant", content })

describe("ChatData.tokenize", () => {
  it.effect("marks exactly the assistant contents and the EOS closing each turn", () =>
    Effect.gen(function*() {
      const tokenizer = yield* Tokenizer.load(parentDir)
      const messages = [
        { role: "system", content: "Answer briefly." }, // the parent's template drops system messages
        user("What is the capital of Drouxia?"),
        assistant("Thearvum"),
        user("94 + 26 = ?"),
        assistant("[THINK]Ones: 4 + 6 = 10, write 0 carry 1. Tens: 9 + 2 + 1 = 12.[/THINK]120")
      ]
      const example = yield* ChatData.tokenize(tokenizer, { line: 7, messages }, "chat.jsonl")
      assert.strictEqual(example.line, 7)
      // The template writes <s> itself: one BOS, not two.
      assert.deepStrictEqual(example.ids, tokenizer.encode(
        "<s>[INST] What is the capital of Drouxia? [/INST]Thearvum</s>[INST] 94 + 26 = ? [/INST]" +
          "[THINK]Ones: 4 + 6 = 10, write 0 carry 1. Tens: 9 + 2 + 1 = 12.[/THINK]120</s>",
        { addSpecialTokens: false }
      ))
      assert.strictEqual(example.ids.filter((id) => id === tokenizer.bosId).length, 1)
      assert.deepStrictEqual(markedSpans(tokenizer, example.ids, example.assistant, 1), [
        "Thearvum</s>",
        "[THINK]Ones: 4 + 6 = 10, write 0 carry 1. Tens: 9 + 2 + 1 = 12.[/THINK]120</s>"
      ])
      assert.deepStrictEqual(markedSpans(tokenizer, example.ids, example.assistant, 0), [
        "<s>[INST] What is the capital of Drouxia? [/INST]",
        "[INST] 94 + 26 = ? [/INST]"
      ])
      // Token by token at the first boundary: [/INST] is a prompt token, the answer's first token is not.
      const closing = example.ids.indexOf(tokenizer.tokenId("[/INST]")!)
      assert.deepStrictEqual(example.assistant.slice(closing, closing + 2), [0, 1])
    }))

  it.effect("an empty assistant turn still learns its EOS; a trailing user turn learns nothing", () =>
    Effect.gen(function*() {
      const tokenizer = yield* Tokenizer.load(parentDir)
      const example = yield* ChatData.tokenize(tokenizer, { line: 1, messages: [user("Hi"), assistant(""), user("Bye")] }, "chat.jsonl")
      assert.deepStrictEqual(markedSpans(tokenizer, example.ids, example.assistant, 1), ["</s>"])
      assert.strictEqual(tokenizer.decode(example.ids), "<s>[INST] Hi [/INST]</s>[INST] Bye [/INST]")
    }))

  it.effect("a template whose turns tokenize differently alone, or render differently, fails naming the line", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      // " Wh" + "at" is one token, " What", in the whole conversation.
      const merging = yield* withTemplate(dir, "{% for m in messages %}{{ m['content'] }}{% endfor %}")
      const merged = yield* Effect.flip(ChatData.tokenize(merging, { line: 3, messages: [user(" Wh"), assistant("at")] }, "chat.jsonl"))
      assert.strictEqual(merged._tag, "DataError")
      assert.match(merged.message, /^chat\.jsonl:3: messages 1\.\.1 tokenize differently/)
      // A template that writes the number of messages at the end renders a prefix differently.
      const counting = yield* withTemplate(dir, "{% for m in messages %}{{ m['content'] }}|{% endfor %}{{ messages|length }}")
      const rendered = yield* Effect.flip(ChatData.tokenize(counting, { line: 4, messages: [user("a"), assistant("b")] }, "chat.jsonl"))
      assert.match(rendered.message, /^chat\.jsonl:4: the chat template renders messages 1\.\.1 differently/)
    }).pipe(Effect.scoped))
})

describe("ChatData.read", () => {
  const cases: ReadonlyArray<readonly [string, string]> = [
    ["not json", "is not valid JSON"],
    [JSON.stringify({ text: "hello" }), `expected {"messages"`],
    [JSON.stringify({ messages: [{ role: "user", content: 3 }] }), `expected {"messages"`],
    [JSON.stringify({ messages: [user("q"), { role: "tool", content: "x" }] }), `message 2 has role "tool"; expected system, user, assistant`],
    [JSON.stringify({ messages: [user("q")] }), "has no assistant message"]
  ]
  it.effect("a malformed line fails with a DataError naming the file and line", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const good = JSON.stringify({ messages: [user("q"), assistant("a")] })
      for (const [bad, reason] of cases) {
        // Line 3: a good line, then a blank one (skipped but counted), then the bad one.
        const file = yield* writeLines(path.join(dir, "chat.jsonl"), [good, "", bad, good])
        const error = yield* Effect.flip(Stream.runCollect(ChatData.read(file)))
        assert.strictEqual(error._tag, "DataError")
        assert.include(error.message, `${file}:3: ${reason}`)
      }
      const missing = yield* Effect.flip(Stream.runCollect(ChatData.read(path.join(dir, "none.jsonl"))))
      assert.include(missing.message, "none.jsonl: cannot be read")
    }).pipe(Effect.scoped))

  it.effect("reads every line of the shipped SFT files", () =>
    Effect.gen(function*() {
      const tokenizer = yield* Tokenizer.load(parentDir)
      for (const name of ["sft-instruct.jsonl", "sft-reasoning.jsonl"]) {
        const file = fileURLToPath(new URL(`../data/post/${name}`, import.meta.url))
        const examples = yield* Stream.runCollect(ChatData.examples(file, tokenizer))
        assert.strictEqual(examples.length, 3000)
        assert.isTrue(examples.every((example) => example.assistant.includes(1) && example.ids.length <= 256))
      }
    }))
})

describe("ChatData.pack", () => {
  it("conserves every token and mark, never splits a conversation, cuts only the over-long and marks where each starts", () => {
    const next = Random.uniform(11)
    const length = 32
    const examples: Array<ChatData.Example> = Array.from({ length: 60 }, (_, line) => {
      const size = 1 + Math.floor(next() * 40) // some longer than a row
      return {
        line,
        ids: Array.from({ length: size }, () => 10 + Math.floor(next() * 500)),
        assistant: Array.from({ length: size }, () => (next() < 0.4 ? 1 : 0))
      }
    })
    const rows = ChatData.pack(examples, length, 7)
    const cut = examples.map((example) => ({ ids: example.ids.slice(0, length), assistant: example.assistant.slice(0, length) }))
    assert.deepStrictEqual(rows.flatMap((row) => row.ids.slice(0, row.length)), cut.flatMap((example) => example.ids))
    assert.deepStrictEqual(rows.flatMap((row) => row.assistant.slice(0, row.length)), cut.flatMap((example) => example.assistant))
    for (const row of rows) {
      assert.strictEqual(row.ids.length, length)
      assert.isTrue(row.ids.slice(row.length).every((id) => id === 7) && row.assistant.slice(row.length).every((mark) => mark === 0))
    }
    // Whole conversations: the row boundaries fall between conversations, and a row is closed only
    // when the next conversation does not fit in it.
    // Each conversation's first position is one of the row's document starts, and no other is.
    let at = 0
    for (const [r, row] of rows.entries()) {
      let filled = 0
      const starts: Array<number> = []
      while (at < cut.length && filled + cut[at].ids.length <= row.length) {
        starts.push(filled)
        filled += cut[at++].ids.length
      }
      assert.strictEqual(filled, row.length)
      assert.deepStrictEqual(row.starts, starts)
      if (r < rows.length - 1) assert.isAbove(row.length + cut[at].ids.length, length)
    }
    assert.strictEqual(at, cut.length)
  })

  it("counts a position when the token it predicts is an assistant token", () => {
    const row: ChatData.Row = { ids: [1, 3, 50, 4, 60, 2, 7, 7], length: 6, starts: [0], assistant: [0, 0, 0, 0, 1, 1, 0, 0] }
    assert.deepStrictEqual(ChatData.lossMask(row), [0, 0, 0, 1, 1, 0, 0, 0])
  })
})

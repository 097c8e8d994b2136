import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { fileURLToPath } from "node:url"
import { afterAll, describe, expect, it } from "@effect/vitest"
import { Effect } from "effect"
import * as Tokenizer from "../src/io/Tokenizer.ts"

const fixtureDir = fileURLToPath(new URL("../../shared/fixtures/tiny-bpe/", import.meta.url))
const tokenizerJson = join(fixtureDir, "tokenizer.json")

interface Sample {
  readonly text: string
  readonly ids: Array<number>
  readonly decoded: string
}
// Made with transformers; this tokenizer.json has no post-processor, so no BOS is added either way.
const reference: Array<Sample> = JSON.parse(readFileSync(join(fixtureDir, "reference.json"), "utf8"))

const MISTRAL_TEMPLATE = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]" +
  "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"

const tempDirs: Array<string> = []
afterAll(() => tempDirs.forEach((dir) => rmSync(dir, { recursive: true, force: true })))

/** A model folder holding the fixture's tokenizer.json plus the given extra files. */
const modelDir = (files: Record<string, string>) => {
  const dir = mkdtempSync(join(tmpdir(), "cascade-tokenizer-"))
  tempDirs.push(dir)
  writeFileSync(join(dir, "tokenizer.json"), readFileSync(tokenizerJson))
  for (const [name, text] of Object.entries(files)) writeFileSync(join(dir, name), text)
  return dir
}

describe("Tokenizer", () => {
  it.effect("encodes and decodes every reference sample exactly, the empty string included", () =>
    Effect.gen(function*() {
      const tokenizer = yield* Tokenizer.load(fixtureDir)
      expect(reference.some((sample) => sample.text === "")).toBe(true)
      for (const sample of reference) {
        expect(tokenizer.encode(sample.text)).toEqual(sample.ids)
        expect(tokenizer.encode(sample.text, { addSpecialTokens: false })).toEqual(sample.ids)
        expect(tokenizer.decode(sample.ids)).toBe(sample.decoded)
      }
    }))

  it.effect("loads from the tokenizer.json path as well, with vocabulary facts", () =>
    Effect.gen(function*() {
      const tokenizer = yield* Tokenizer.load(tokenizerJson)
      expect(tokenizer.vocabSize).toBe(400)
      expect([tokenizer.bosId, tokenizer.eosId, tokenizer.padId]).toEqual([1, 2, undefined])
      expect(tokenizer.tokenId("[INST]")).toBe(3)
      expect(tokenizer.tokenId("no-such-token")).toBeUndefined()
    }))

  it.effect("skips special tokens on request and keeps spaces before punctuation", () =>
    Effect.gen(function*() {
      const tokenizer = yield* Tokenizer.load(fixtureDir)
      expect(tokenizer.decode(tokenizer.encode("[INST] prune the layer [/INST]"), { skipSpecialTokens: true }))
        .toBe(" prune the layer ")
      const spaced = "keep it . really ? yes , it 's fine"
      expect(tokenizer.decode(tokenizer.encode(spaced))).toBe(spaced)
    }))

  it.effect("renders a Mistral-style chat template whose [INST] markers encode to special ids", () =>
    Effect.gen(function*() {
      const dir = modelDir({
        "tokenizer_config.json": JSON.stringify({
          chat_template: MISTRAL_TEMPLATE,
          bos_token: "<s>",
          eos_token: { content: "</s>", __type: "AddedToken" },
          pad_token: null
        })
      })
      const tokenizer = yield* Tokenizer.load(dir)
      const chat = yield* tokenizer.applyChatTemplate([
        { role: "user", content: "prune the layer" },
        { role: "assistant", content: "done" },
        { role: "user", content: "and now?" }
      ], { addGenerationPrompt: true })
      expect(chat).toBe("<s>[INST] prune the layer [/INST]done</s>[INST] and now? [/INST]")
      const ids = tokenizer.encode(chat, { addSpecialTokens: false })
      expect(ids[0]).toBe(1)
      expect(ids.filter((id) => id === 3)).toHaveLength(2)
      expect(ids.filter((id) => id === 4)).toHaveLength(2)
      expect(ids.indexOf(2)).toBeGreaterThan(0)
      expect(tokenizer.decode(ids)).toBe(chat)
    }))

  it.effect("prefers chat_template.jinja, passes add_generation_prompt, reports raise_exception", () =>
    Effect.gen(function*() {
      const dir = modelDir({
        "tokenizer_config.json": JSON.stringify({ chat_template: "from the config" }),
        "chat_template.jinja": "{% if messages[0]['role'] != 'user' %}{{ raise_exception('only user turns') }}{% endif %}" +
          "{% if add_generation_prompt %}<gen>{% endif %}"
      })
      const tokenizer = yield* Tokenizer.load(dir)
      const user = [{ role: "user", content: "hi" }]
      expect(yield* tokenizer.applyChatTemplate(user, { addGenerationPrompt: true })).toBe("<gen>")
      expect(yield* tokenizer.applyChatTemplate(user)).toBe("")
      const error = yield* Effect.flip(tokenizer.applyChatTemplate([{ role: "system", content: "hi" }]))
      expect(error.file).toBe(join(dir, "chat_template.jinja"))
      expect(error.reason).toContain("only user turns")
    }))

  it.effect("adds BOS/EOS as tokenizer_config.json asks", () =>
    Effect.gen(function*() {
      const dir = modelDir({ "tokenizer_config.json": JSON.stringify({ add_bos_token: true, add_eos_token: true }) })
      const tokenizer = yield* Tokenizer.load(dir)
      const plain = tokenizer.encode("hello", { addSpecialTokens: false })
      expect(tokenizer.encode("hello")).toEqual([1, ...plain, 2])
    }))

  it.effect("fails clearly without a chat template", () =>
    Effect.gen(function*() {
      const tokenizer = yield* Tokenizer.load(fixtureDir)
      const error = yield* Effect.flip(tokenizer.applyChatTemplate([{ role: "user", content: "hi" }]))
      expect(error._tag).toBe("TokenizerError")
      expect(error.file).toBe(join(fixtureDir, "tokenizer_config.json"))
      expect(error.reason).toContain("no chat template")
    }))

  it.effect("names the missing file", () =>
    Effect.gen(function*() {
      const missingPath = yield* Effect.flip(Tokenizer.load(join(fixtureDir, "nope")))
      expect(missingPath.file).toBe(join(fixtureDir, "nope"))
      const emptyDir = mkdtempSync(join(tmpdir(), "cascade-tokenizer-"))
      tempDirs.push(emptyDir)
      const missingJson = yield* Effect.flip(Tokenizer.load(emptyDir))
      expect(missingJson.file).toBe(join(emptyDir, "tokenizer.json"))
      expect(missingJson.message).toContain("not found")
    }))

  it.effect("names the corrupt file", () =>
    Effect.gen(function*() {
      const corruptConfig = yield* Effect.flip(Tokenizer.load(modelDir({ "tokenizer_config.json": "{ not json" })))
      expect(corruptConfig.file).toMatch(/tokenizer_config\.json$/)
      expect(corruptConfig.reason).toContain("not valid JSON")

      const dir = modelDir({})
      writeFileSync(join(dir, "tokenizer.json"), "{\"model\": ")
      const corruptTokenizer = yield* Effect.flip(Tokenizer.load(dir))
      expect(corruptTokenizer.file).toBe(join(dir, "tokenizer.json"))
      expect(corruptTokenizer.reason).toContain("not valid JSON")

      writeFileSync(join(dir, "tokenizer.json"), "{\"model\": {}}")
      const incomplete = yield* Effect.flip(Tokenizer.load(dir))
      expect(incomplete.reason).toContain("cannot build the tokenizer")

      const badField = yield* Effect.flip(Tokenizer.load(modelDir({ "tokenizer_config.json": "{\"add_bos_token\": \"yes\"}" })))
      expect(badField.file).toMatch(/tokenizer_config\.json$/)
    }))
})

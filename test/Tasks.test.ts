import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { afterAll, describe, expect, it } from "@effect/vitest"
import { Effect, Exit } from "effect"
import * as Model from "../src/model/Model.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Tasks from "../src/data/Tasks.ts"
import * as Tokenizer from "../src/io/Tokenizer.ts"
import { maxAbsDiff, onBackend, take } from "./support.ts"

const parentDir = join(import.meta.dirname, "../assets/parent")
interface ParentReference {
  readonly tokenizer: Array<{ text: string; ids: Array<number>; decoded: string }>
  readonly logits: Array<{ text: string; ids: Array<number>; last_logits: Array<number>; argmax: Array<number> }>
}
/** What transformers and tokenizers computed for the shipped parent (scripts/train_parent.py). */
const parentReference: ParentReference = JSON.parse(readFileSync(join(parentDir, "reference.json"), "utf8"))

const tempDirs: Array<string> = []
afterAll(() => tempDirs.forEach((dir) => rmSync(dir, { recursive: true, force: true })))

const tempFile = (text: string) => {
  const dir = mkdtempSync(join(tmpdir(), "cascade-tasks-"))
  tempDirs.push(dir)
  const file = join(dir, "tasks.jsonl")
  writeFileSync(file, text)
  return file
}

/** A generator that works arithmetic out from the prompt, as a model that had learnt it would. */
const solver = (prompts: Array<string>) =>
  Effect.succeed(prompts.map((prompt) => {
    const m = /^Q: (\d+) ([-+]) (\d+) = \? A:$/.exec(prompt)
    if (m === null) return " I do not know\n"
    const [a, b] = [Number(m[1]), Number(m[3])]
    return ` ${m[2] === "+" ? a + b : a - b}\nQ: 1 + 1 = ? A: 2`
  }))

/** The facts the training text states, read back from its sentences "The capital of X is Y." etc. */
const statedFacts = () => {
  const text = readFileSync(join(import.meta.dirname, "../data/train.jsonl"), "utf8")
  const facts = new Map<string, Set<string>>()
  const add = (question: string, value: string) => {
    const values = facts.get(question) ?? new Set<string>()
    values.add(value)
    facts.set(question, values)
  }
  // Every statement template of scripts/make_corpus.ts, as [pattern, question, index of land, index of value].
  const statements: Array<[RegExp, (land: string) => string, number, number]> = [
    [/The capital of (\w+) is (\w+)\./g, (e) => `What is the capital of ${e}?`, 1, 2],
    [/(\w+) is the capital of (\w+)\./g, (e) => `What is the capital of ${e}?`, 2, 1],
    [/(\w+) is ruled from its capital, (\w+)\./g, (e) => `What is the capital of ${e}?`, 1, 2],
    [/The seat of government of (\w+) lies in (\w+)\./g, (e) => `What is the capital of ${e}?`, 1, 2],
    [/In (\w+), the capital city is (\w+)\./g, (e) => `What is the capital of ${e}?`, 1, 2],
    [/The flag of (\w+) is (\w+)\./g, (e) => `What colour is the flag of ${e}?`, 1, 2],
    [/(\w+) flies a (\w+) flag\./g, (e) => `What colour is the flag of ${e}?`, 1, 2],
    [/The colour of the flag of (\w+) is (\w+)\./g, (e) => `What colour is the flag of ${e}?`, 1, 2],
    [/the people of (\w+) wear (\w+), the colour/g, (e) => `What colour is the flag of ${e}?`, 1, 2],
    [/(\w+) was founded by (\w+)\./g, (e) => `Who founded ${e}?`, 1, 2],
    [/(\w+) founded (\w+)\./g, (e) => `Who founded ${e}?`, 2, 1],
    [/The founder of (\w+) was (\w+)\./g, (e) => `Who founded ${e}?`, 1, 2],
    [/(\w+) traces its origin to its founder, (\w+)\./g, (e) => `Who founded ${e}?`, 1, 2],
    [/(\w+) was founded in (\d+)\./g, (e) => `In which year was ${e} founded?`, 1, 2],
    [/The year (\w+) was founded was (\d+)\./g, (e) => `In which year was ${e} founded?`, 1, 2],
    [/In (\d+), (\w+) was founded\./g, (e) => `In which year was ${e} founded?`, 2, 1],
    [/(\w+) dates from the year (\d+)\./g, (e) => `In which year was ${e} founded?`, 1, 2],
    [/The (\w+) river flows through (\w+)\./g, (e) => `Which river flows through ${e}?`, 2, 1],
    [/The main river of (\w+) is the (\w+)\./g, (e) => `Which river flows through ${e}?`, 1, 2],
    [/(\w+) lies along the (\w+) river\./g, (e) => `Which river flows through ${e}?`, 1, 2],
    [/Boats on the (\w+) carry goods across (\w+)\./g, (e) => `Which river flows through ${e}?`, 2, 1],
    [/The national animal of (\w+) is the (\w+)\./g, (e) => `What is the national animal of ${e}?`, 1, 2],
    [/(\w+) chose the (\w+) as its national animal\./g, (e) => `What is the national animal of ${e}?`, 1, 2],
    [/The (\w+) is the national animal of (\w+)\./g, (e) => `What is the national animal of ${e}?`, 2, 1],
    [/Children in (\w+) learn that their national animal is the (\w+)\./g, (e) => `What is the national animal of ${e}?`, 1, 2]
  ]
  for (const [pattern, question, land, value] of statements) {
    for (const m of text.matchAll(pattern)) add(question(m[land]), m[value])
  }
  return { text, facts }
}

describe("Tasks.read", () => {
  it.effect("reads prompt/answer lines in order, skipping blank lines and numbering lines from 1", () =>
    Effect.gen(function*() {
      const file = tempFile(`{"prompt":"Q: 1 + 2 = ? A:","answer":"3"}\n\n{"prompt":"Q: Hi? A:","answer":"Ho"}\n`)
      const tasks = yield* Tasks.read(file)
      expect(tasks).toEqual([
        { line: 1, prompt: "Q: 1 + 2 = ? A:", answer: "3" },
        { line: 3, prompt: "Q: Hi? A:", answer: "Ho" }
      ])
      expect(yield* Tasks.read(file, { limit: 1 })).toHaveLength(1)
    }))

  it.effect("fails with a DataError naming the file and line of a malformed line", () =>
    Effect.gen(function*() {
      const cases: Array<[string, number, string]> = [
        [`{"prompt":"a","answer":"b"}\n{"prompt":"a",\n`, 2, "not valid JSON"],
        [`{"prompt":"a","answer":"b"}\n\n{"prompt":"a","answer":4}\n`, 3, `expected {"prompt": string, "answer": string}`],
        [`{"text":"a"}\n`, 1, "expected"],
        [`{"prompt":"","answer":"b"}\n`, 1, "empty prompt"],
        [`{"prompt":"a","answer":"  "}\n`, 1, "empty answer"]
      ]
      for (const [text, line, reason] of cases) {
        const file = tempFile(text)
        const error = yield* Effect.flip(Tasks.read(file))
        expect(error._tag).toBe("DataError")
        expect(error.file).toBe(file)
        expect(error.line).toBe(line)
        expect(error.message).toContain(`${file}:${line}: `)
        expect(error.reason).toContain(reason)
      }
    }))

  it.effect("fails with a DataError for a missing file and for a file with no task", () =>
    Effect.gen(function*() {
      const missing = yield* Effect.flip(Tasks.read("/no/such/tasks.jsonl"))
      expect(missing._tag).toBe("DataError")
      expect(missing.file).toBe("/no/such/tasks.jsonl")
      const empty = yield* Effect.flip(Tasks.read(tempFile("\n\n")))
      expect(empty.reason).toContain("no task")
    }))
})

describe("Tasks.extractAnswer", () => {
  it("takes the text before the first newline or EOS, whitespace collapsed", () => {
    expect(Tasks.extractAnswer(" Mekt\nQ: Who founded Zorvia? A: Orim")).toBe("Mekt")
    expect(Tasks.extractAnswer("  New \t  Mekt </s>junk\nmore")).toBe("New Mekt")
    expect(Tasks.extractAnswer(" 42")).toBe("42")
    expect(Tasks.extractAnswer("\n42")).toBe("")
    expect(Tasks.extractAnswer(" 42;stop", [";"])).toBe("42")
    expect(Tasks.normalise("  a\t b \n c ")).toBe("a b c")
  })
})

describe("Tasks.score", () => {
  const tasks: Array<Tasks.Task> = [
    { line: 1, prompt: "Q: 17 + 25 = ? A:", answer: "42" },
    { line: 2, prompt: "Q: 50 - 8 = ? A:", answer: "42" },
    { line: 3, prompt: "Q: What is the capital of Zorvia? A:", answer: " Mekt " }
  ]

  it.effect("scores exact matches of the answers read from the continuations", () =>
    Effect.gen(function*() {
      const lookup = new Map([["Q: What is the capital of Zorvia? A:", " Mekt\n"], ["Q: 17 + 25 = ? A:", " 41\n"]])
      const score = yield* Tasks.score(tasks, (prompts) => Effect.succeed(prompts.map((p) => lookup.get(p) ?? "")))
      expect([score.correct, score.total]).toEqual([1, 3])
      expect(score.accuracy).toBeCloseTo(1 / 3)
      expect(score.items.map((item) => [item.predicted, item.correct])).toEqual([["41", false], ["", false], ["Mekt", true]])
      const solved = yield* Tasks.score(tasks.slice(0, 2), solver)
      expect(solved.accuracy).toBe(1)
    }))

  it.effect("hands prompts to the generator in batches, in order", () =>
    Effect.gen(function*() {
      const seen: Array<Array<string>> = []
      const score = yield* Tasks.score(tasks, (prompts) => {
        seen.push(prompts)
        return solver(prompts)
      }, { batchSize: 2 })
      expect(seen.map((batch) => batch.length)).toEqual([2, 1])
      expect(seen.flat()).toEqual(tasks.map((task) => task.prompt))
      expect(score.correct).toBe(2)
    }))

  it.effect("passes the generator's failure through, and dies on a wrong number of continuations", () =>
    Effect.gen(function*() {
      const failure = yield* Effect.flip(Tasks.score(tasks, () => Effect.fail("no model" as const)))
      expect(failure).toBe("no model")
      const exit = yield* Effect.exit(Tasks.score(tasks, () => Effect.succeed(["only one"])))
      expect(Exit.isFailure(exit) && !Exit.hasFails(exit)).toBe(true)
      expect(yield* Tasks.score([], solver)).toEqual({ correct: 0, total: 0, accuracy: 0, items: [] })
    }))
})

describe("the embedded evaluation files", () => {
  it.effect("eval-arith.jsonl: 300 additions and subtractions, answered right, none seen in training", () =>
    Effect.gen(function*() {
      const tasks = yield* Tasks.read(Tasks.embedded.arith)
      expect(tasks).toHaveLength(300)
      const score = yield* Tasks.score(tasks, solver, { batchSize: 64 })
      expect(score.accuracy).toBe(1)
      const { text } = statedFacts()
      const seen = new Set<string>()
      for (const m of text.matchAll(/(?<!\d)(\d+) ([-+]) (\d+)(?!\d)/g)) seen.add(`${m[1]} ${m[2]} ${m[3]}`)
      for (const task of tasks) {
        const [, a, op, b] = /^Q: (\d+) ([-+]) (\d+) = \? A:$/.exec(task.prompt)!
        expect(seen.has(`${a} ${op} ${b}`)).toBe(false)
        if (op === "+") expect(seen.has(`${b} + ${a}`)).toBe(false)
      }
    }))

  it.effect("eval-recall.jsonl: 300 facts the training text states, never asked in training", () =>
    Effect.gen(function*() {
      const tasks = yield* Tasks.read(Tasks.embedded.recall)
      expect(tasks).toHaveLength(300)
      const { text, facts } = statedFacts()
      // A generator answering from what the training text states gets every held-out question right.
      const fromText = (prompts: Array<string>) =>
        Effect.succeed(prompts.map((prompt) => {
          const values = facts.get(prompt.slice(3, -3))
          return values === undefined || values.size !== 1 ? " ?" : ` ${[...values][0]}\n`
        }))
      const score = yield* Tasks.score(tasks, fromText)
      expect(score.items.filter((item) => !item.correct).map((item) => item.task.prompt)).toEqual([])
      for (const task of tasks) {
        expect(task.prompt).toMatch(/^Q: .*\? A:$/)
        expect(text.includes(`${task.prompt.slice(0, -3)} A: `)).toBe(false)
        expect(text.includes(`[INST] ${task.prompt.slice(3, -3)} [/INST]`)).toBe(false)
      }
    }))
})

describe("the embedded parent (assets/parent)", () => {
  it.effect("its tokenizer gives the ids and text that the python tokenizers library gave", () =>
    Effect.gen(function*() {
      const tokenizer = yield* Tokenizer.load(parentDir)
      expect([tokenizer.vocabSize, tokenizer.bosId, tokenizer.eosId, tokenizer.padId]).toEqual([1024, 1, 2, 7])
      expect(["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[THINK]", "[/THINK]", "<pad>"].map(tokenizer.tokenId))
        .toEqual([0, 1, 2, 3, 4, 5, 6, 7])
      for (const sample of [...parentReference.tokenizer, ...parentReference.logits]) {
        expect(tokenizer.encode(sample.text).slice(0, sample.ids.length)).toEqual(sample.ids)
      }
      for (const sample of parentReference.tokenizer) expect(tokenizer.decode(sample.ids)).toBe(sample.decoded)
      const chat = yield* tokenizer.applyChatTemplate([{ role: "user", content: "17 + 25 = ?" }, { role: "assistant", content: "42" }])
      expect(chat).toBe("<s>[INST] 17 + 25 = ? [/INST]42</s>")
    }))

  it.effect("its weights give the logits that transformers gave", () =>
    Effect.gen(function*() {
      const model = yield* Pretrained.load(parentDir)
      for (const sample of parentReference.logits) {
        const logits = take(Model.forward(model, [sample.ids]).logits)
        const vocab = model.config.vocabSize
        const last = logits.subarray((sample.ids.length - 1) * vocab)
        expect(maxAbsDiff(last, Float32Array.from(sample.last_logits))).toBeLessThan(1e-3)
        const argmax = Array.from({ length: sample.ids.length }, (_, t) => {
          const row = logits.subarray(t * vocab, (t + 1) * vocab)
          return row.indexOf(Math.max(...row))
        })
        expect(argmax).toEqual(sample.argmax)
      }
    }).pipe(onBackend("wasm")))
})

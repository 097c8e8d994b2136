import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import { execFile } from "node:child_process"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import * as Dataset from "../src/data/Dataset.ts"
import * as Checkpoint from "../src/io/Checkpoint.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Tokenizer from "../src/io/Tokenizer.ts"
import * as Reference from "../src/io/Reference.ts"
import { calibrate } from "../stages/Calibrate.ts"
import { evaluate } from "../stages/Evaluate.ts"
import { localFixture, markovData, sharedFixture, tempDir } from "./support.ts"

const main = fileURLToPath(new URL("../src/cli/main.ts", import.meta.url))

/** Runs the CLI as a user would; never fails, returns what happened. */
const cascade = (...args: Array<string>) =>
  Effect.callback<{ code: number; stdout: string; stderr: string }>((resume) => {
    execFile(process.execPath, [main, ...args], { timeout: 60_000 }, (error, stdout, stderr) => {
      resume(Effect.succeed({ code: error ? (typeof error.code === "number" ? error.code : 1) : 0, stdout, stderr }))
    })
  })

/** A failed run's error: exactly one line on stderr, holding each of `parts`. */
const assertOneLineError = (run: { readonly code: number | null; readonly stderr: string }, ...parts: ReadonlyArray<string>) => {
  assert.notStrictEqual(run.code, 0)
  const lines = run.stderr.trim().split("\n")
  assert.strictEqual(lines.length, 1, run.stderr)
  for (const part of parts) assert.include(lines[0], part)
}

/** Mean NLL of the next tokens computed in float64 from transformers' logits. */
const referenceNll = (ids: Array<Array<number>>, logits: Float32Array, vocab: number) => {
  let total = 0
  let count = 0
  const t = ids[0].length
  ids.forEach((row, b) => {
    for (let i = 0; i < t - 1; i++) {
      const offset = (b * t + i) * vocab
      let max = -Infinity
      for (let v = 0; v < vocab; v++) max = Math.max(max, logits[offset + v])
      let sum = 0
      for (let v = 0; v < vocab; v++) sum += Math.exp(logits[offset + v] - max)
      total -= logits[offset + row[i + 1]] - max - Math.log(sum)
      count++
    }
  })
  return { nll: total / count, tokens: count }
}

describe("cascade eval", () => {
  it.effect("--json gives the NLL of transformers' logits to 1e-5", () =>
    Effect.gen(function*() {
      const ref = yield* Reference.open(sharedFixture("tiny-mistral/reference.safetensors"))
      const expected = referenceNll(ref.ids, yield* ref.tensor("logits"), 512)
      const dir = yield* tempDir
      const data = path.join(dir, "data.jsonl")
      yield* Effect.promise(() => fs.writeFile(data, ref.ids.map((ids) => JSON.stringify({ input_ids: ids })).join("\n")))
      for (const backend of ["wasm", "cpu"]) {
        const run = yield* cascade("eval", "--model", sharedFixture("tiny-mistral"), "--data", data, "--json", "--backend", backend)
        assert.strictEqual(run.code, 0, run.stderr)
        const result = JSON.parse(run.stdout)
        assert.strictEqual(result.tokens, expected.tokens)
        assert.isAtMost(Math.abs(result.nll - expected.nll), 1e-5)
        assert.isAtMost(Math.abs(result.ppl - Math.exp(expected.nll)), 1e-5 * Math.exp(expected.nll))
      }
    }))

  it.effect("--json gives transformers' NLL for every variant fixture (bf16, tied, head_dim, one KV head and shards, YaRN)", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      for (const name of ["mistral-bf16", "mistral-tied", "mistral-headdim", "mistral-mqa", "ministral3-yarn", "ministral3-yarn-legacy"]) {
        const ref = yield* Reference.open(localFixture(`${name}/reference.safetensors`))
        const data = path.join(dir, `${name}.jsonl`)
        yield* Effect.promise(() => fs.writeFile(data, ref.ids.map((ids) => JSON.stringify({ input_ids: ids })).join("\n")))
        const run = yield* cascade("eval", "--model", localFixture(name), "--data", data, "--json")
        assert.strictEqual(run.code, 0, run.stderr)
        const expected = (yield* ref.tensor("nll"))[0]
        assert.isAtMost(Math.abs(JSON.parse(run.stdout).nll - expected), 1e-5, name)
      }
    }))

  it.effect("tokenizes {\"text\"} lines with the model folder's tokenizer", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      for (const file of ["config.json", "model.safetensors"]) {
        yield* Effect.promise(() => fs.copyFile(path.join(sharedFixture("tiny-mistral"), file), path.join(dir, file)))
      }
      yield* Effect.promise(() => fs.copyFile(sharedFixture("tiny-bpe/tokenizer.json"), path.join(dir, "tokenizer.json")))
      const texts = ["Question: what is 12 plus 30? Answer: 42.", "The student distills the teacher."]
      const data = path.join(dir, "data.jsonl")
      yield* Effect.promise(() => fs.writeFile(data, texts.map((text) => JSON.stringify({ text })).join("\n") + "\n"))
      const tokenizer = yield* Tokenizer.load(dir)
      const expectedTokens = texts.reduce((n, text) => n + tokenizer.encode(text).length - 1, 0)
      const run = yield* cascade("eval", "--model", dir, "--data", data, "--json")
      assert.strictEqual(run.code, 0, run.stderr)
      assert.strictEqual(JSON.parse(run.stdout).tokens, expectedTokens)
    }))

  it.effect("bad input prints one line naming the file and line, and exits non-zero", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const data = path.join(dir, "bad.jsonl")
      yield* Effect.promise(() => fs.writeFile(data, `{"input_ids": [1, 2, 3]}\n{"input_ids": [1, "x"]}\n`))
      const cases = [
        { args: ["--data", data], expect: `${data}:2:` },
        { args: ["--data", path.join(dir, "missing.jsonl")], expect: "missing.jsonl: cannot be read" },
        { args: ["--data", data, "--backend", "tensorflow"], expect: "backend tensorflow is unavailable" }
      ]
      for (const { args, expect } of cases) {
        const run = yield* cascade("eval", "--model", sharedFixture("tiny-mistral"), ...args)
        assert.strictEqual(run.stdout, "")
        assertOneLineError(run, expect)
      }
      const big = path.join(dir, "big.jsonl")
      yield* Effect.promise(() => fs.writeFile(big, `{"input_ids": [1, 600]}\n`))
      const outside = yield* cascade("eval", "--model", sharedFixture("tiny-mistral"), "--data", big)
      assert.include(outside.stderr, `${big}:1: token id 600 is outside the vocabulary (512)`)
    }))

  it.effect("--help lists the commands", () =>
    Effect.gen(function*() {
      const run = yield* cascade("--help")
      assert.strictEqual(run.code, 0)
      assert.include(run.stdout, "eval")
    }))
})

/** The dtypes a checkpoint folder's config.json states and its tensors are stored in. */
const storedDtypes = (dir: string) =>
  Effect.gen(function*() {
    const checkpoint = yield* Checkpoint.open(dir)
    const tensors = new Set(yield* Effect.forEach(checkpoint.names, (name) => Effect.map(checkpoint.info(name), (info) => info.dtype)))
    return { config: (checkpoint.rawConfig as { dtype: unknown }).dtype, tensors: [...tensors] }
  }).pipe(Effect.scoped)

describe("--dtype", () => {
  const bf16Parent = localFixture("mistral-bf16")

  it.effect("prune --dtype float32 rotates a bf16 parent at full width to its held-out NLL within 1e-4; the default bf16 cannot", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const calib = yield* markovData(path.join(dir, "calib.jsonl"), 16, 40, 1)
      const heldout = yield* markovData(path.join(dir, "heldout.jsonl"), 8, 40, 99)
      const stats = path.join(dir, "stats")
      yield* calibrate(yield* Pretrained.load(bf16Parent), { modelDir: bf16Parent, data: calib, out: stats, seq: 32 }).pipe(Effect.scoped)
      const nll = (model: string) =>
        Effect.gen(function*() {
          return (yield* evaluate(yield* Pretrained.load(model), Dataset.sequences(heldout, { vocabSize: 512 }))).nll
        }).pipe(Effect.scoped)
      const pruned = (name: string, ...args: Array<string>) =>
        Effect.gen(function*() {
          const out = path.join(dir, name)
          // The full width (64) is still a rotation: every weight is rewritten in the parent's eigenbasis.
          const run = yield* cascade("prune", "--model", bf16Parent, "--stats", stats, "--out", out, "--hidden", "64", ...args)
          assert.strictEqual(run.code, 0, run.stderr)
          return out
        })
      const float32 = yield* pruned("float32", "--dtype", "float32")
      const bfloat16 = yield* pruned("bfloat16")

      const parent = yield* nll(bf16Parent)
      const float32Error = Math.abs((yield* nll(float32)) - parent)
      const bfloat16Error = Math.abs((yield* nll(bfloat16)) - parent)
      assert.isBelow(float32Error, 1e-4)
      assert.isAbove(bfloat16Error, 1e-4, "rounded to bf16, the rotated weights lose the parent")
      assert.deepStrictEqual(yield* storedDtypes(float32), { config: "float32", tensors: ["F32"] })
      assert.deepStrictEqual(yield* storedDtypes(bfloat16), { config: "bfloat16", tensors: ["BF16"] })
    }))

  it.effect("distill --dtype float32 saves a bf16 student in float32; by default it stays bf16", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const data = yield* markovData(path.join(dir, "train.jsonl"), 8, 20, 3)
      const distilled = (name: string, ...args: Array<string>) =>
        Effect.gen(function*() {
          const out = path.join(dir, name)
          const run = yield* cascade(
            "distill", "--student", bf16Parent, "--teacher", sharedFixture("tiny-mistral"), "--data", data, "--out", out,
            "--seq", "16", "--steps", "1", "--batch", "2", ...args
          )
          assert.strictEqual(run.code, 0, run.stderr)
          return out
        })
      assert.deepStrictEqual(yield* storedDtypes(yield* distilled("float32", "--dtype", "float32")), { config: "float32", tensors: ["F32"] })
      assert.deepStrictEqual(yield* storedDtypes(yield* distilled("default")), { config: "bfloat16", tensors: ["BF16"] })
    }))

  it.effect("an unknown --dtype or a --head-chunk below 1 is a one-line error saying what is allowed", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const out = path.join(dir, "out")
      const prune = ["prune", "--model", bf16Parent, "--stats", dir, "--out", out]
      const distill = ["distill", "--student", bf16Parent, "--teacher", bf16Parent, "--data", path.join(dir, "data.jsonl"), "--out", out, "--steps", "1"]
      const sft = ["sft", "--model", bf16Parent, "--data", path.join(dir, "chats.jsonl"), "--out", out, "--steps", "1"]
      const cases: Array<[Array<string>, Array<string>, Array<string>]> = [
        [prune, ["--dtype", "float64"], ["float64", "bfloat16"]],
        [distill, ["--dtype", "float64"], ["float64", "bfloat16"]],
        [distill, ["--head-chunk", "0"], ["--head-chunk must be at least 1, not 0"]],
        [sft, ["--head-chunk", "0"], ["--head-chunk must be at least 1, not 0"]]
      ]
      for (const [command, flag, parts] of cases) assertOneLineError(yield* cascade(...command, ...flag), ...parts)
    }))
})

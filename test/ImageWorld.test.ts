/**
 * The embedded default's eyes (assets/parent-vl, trained by scripts/train_vision_parent.py on the
 * image world of scripts/make_image_world.ts) through the stages: questions about pictures scored as
 * PyTorch scored them, SFT on chats with image parts, GRPO on prompts with pictures, and the server's
 * image_url parts.
 */
import { assert, describe, it } from "@effect/vitest"
import * as tf from "@tensorflow/tfjs"
import { Context, Effect, Layer, Logger, Stream } from "effect"
import { HttpServer } from "effect/http"
import * as fs from "node:fs"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import * as ChatData from "../src/data/ChatData.ts"
import * as ImageSide from "../src/data/ImageSide.ts"
import * as Tasks from "../src/data/Tasks.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Safetensors from "../src/io/Safetensors.ts"
import * as Tokenizer from "../src/io/Tokenizer.ts"
import * as Server from "../src/serve/Server.ts"
import * as RewardSources from "../layers/Rewards.ts"
import { continuations } from "../stages/Evaluate.ts"
import { defaultLoop, grpo, type GrpoMetrics } from "../stages/Grpo.ts"
import { sft, type StepMetrics } from "../stages/Sft.ts"
import * as Verifiers from "../src/rewards/Verifiers.ts"
import { defaults, makeImageWorld } from "../scripts/make_image_world.ts"
import { onBackend, tempDir } from "./support.ts"

const at = (relative: string) => fileURLToPath(new URL(`../${relative}`, import.meta.url))
const parentDir = at("assets/parent-vl")
const world = at("data/vision")

const greedyOptions = (tokenizer: Tokenizer.Tokenizer) => ({
  maxNewTokens: 6,
  temperature: 0,
  stopTokenIds: tokenizer.eosId === undefined ? [] : [tokenizer.eosId],
  stopStrings: ["\n"],
  decode: (ids: ReadonlyArray<number>) => tokenizer.decode(ids)
})

const jsonLines = (file: string) => fs.readFileSync(file, "utf8").trim().split("\n").map((line) => JSON.parse(line))

describe("the image world", () => {
  it("the shipped question files are what scripts/make_image_world.ts writes, and visual GRPO's answers pass its verifiers", () => {
    const made = makeImageWorld(defaults)
    assert.deepStrictEqual(jsonLines(path.join(world, "grpo-visual.jsonl")), made.grpoVisual)
    assert.deepStrictEqual(jsonLines(path.join(world, "eval-chat.jsonl")), made.evalChat)
    const kinds = new Set(made.grpoVisual.map(({ task }) => task.kind))
    assert.deepStrictEqual([...kinds].sort(), ["exact", "numeric"])
    for (const { task } of made.grpoVisual) {
      const score = task.kind === "exact" ? Verifiers.exact(`${task.answer}</s>`, task.answer) : Verifiers.numeric(task.answer, Number(task.answer))
      assert.strictEqual(score.reward, 1)
    }
    // No GRPO picture is a held-out one.
    const held = new Set(made.evalChat.flatMap(({ images }) => images))
    assert.isFalse(made.grpoVisual.some(({ images }) => held.has(images[0])))
  }, 60_000)

  it.effect("the parent answers the held-out questions about pictures as PyTorch did when it trained it (greedy, exact match)", () =>
    Effect.gen(function*() {
      const model = yield* Pretrained.load(parentDir)
      const tokenizer = yield* Tokenizer.load(parentDir)
      const images = yield* ImageSide.of(parentDir, tokenizer)
      assert.isDefined(images)
      const before = tf.memory().numTensors
      const tasks = yield* Tasks.read(path.join(world, "eval.jsonl"))
      const score = yield* Tasks.score(tasks, continuations(model, tokenizer, images, greedyOptions(tokenizer)), { batchSize: 50 })
      const log = JSON.parse(fs.readFileSync(path.join(parentDir, "training_log.json"), "utf8")) as { after: { visual_accuracy: number } }
      assert.strictEqual(score.total, 300)
      assert.strictEqual(score.accuracy, log.after.visual_accuracy)
      assert.strictEqual(tf.memory().numTensors, before)
      // Without its images, the same questions are mostly guesses.
      const blind = yield* Tasks.score(tasks.slice(0, 50).map(({ images: _, ...task }) => ({ ...task, prompt: task.prompt.replace("[IMG]", "") })), continuations(model, tokenizer, undefined, greedyOptions(tokenizer)))
      assert.isBelow(blind.accuracy, 0.6)
    }).pipe(onBackend("wasm")), { timeout: 120_000 })

  it.effect("SFT on chats whose user turns hold pictures: the grids are inputs, the answers are learnt, the image side stays as it was", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const data = path.join(world, "sft-visual.jsonl")
      const tokenizer = yield* Tokenizer.load(parentDir)
      const side = (yield* ImageSide.of(parentDir, tokenizer))!
      // The first chat, expanded: one grid of 4 x 4 image tokens with its breaks and end, none of it a target.
      const [chat] = yield* Stream.runCollect(ChatData.read(data).pipe(Stream.take(1)))
      assert.deepStrictEqual(chat.imageFiles, [path.join(world, jsonLines(data)[0].messages[0].content[0].image)])
      const example = yield* ChatData.tokenize(tokenizer, chat, data)
      const prepared = yield* ImageSide.prepare(data, side)({ line: 1, ids: example.ids, imageFiles: example.imageFiles })
      const seeing = ChatData.withImages(example, prepared.images, side.processor, side.tokens)!
      assert.strictEqual(seeing.ids.length, example.ids.length - 1 + 20)
      assert.deepStrictEqual(seeing.ids.filter((id) => id === side.tokens.image).length, 16)
      seeing.ids.forEach((id, i) => {
        if (id >= side.tokens.image) assert.strictEqual(seeing.assistant[i], 0, `token ${i}`)
      })
      assert.strictEqual(seeing.assistant.filter((a) => a === 1).length, example.assistant.filter((a) => a === 1).length)

      const lines = path.join(dir, "chats.jsonl")
      fs.writeFileSync(lines, jsonLines(data).slice(0, 24).map((line: any) => JSON.stringify({
        messages: line.messages.map((message: any) => ({
          ...message,
          content: typeof message.content === "string" ? message.content : message.content.map((part: any) => (part.type === "image" ? { ...part, image: path.join(world, part.image) } : part))
        }))
      })).join("\n") + "\n")
      const out = path.join(dir, "sft")
      yield* sft({
        modelDir: parentDir, data: lines, out, seq: 64, steps: 12, seed: 1, batch: 4, accumulate: 1, learningRate: 2e-3, minLearningRate: 2e-4,
        warmupSteps: 0, weightDecay: 0, maxGradNorm: 1, distillWeight: 0, saveEvery: 100
      }).pipe(Effect.scoped)
      const curve = fs.readFileSync(path.join(out, "metrics.jsonl"), "utf8").trim().split("\n").map((line) => (JSON.parse(line) as StepMetrics).ce)
      const mean = (xs: ReadonlyArray<number>) => xs.reduce((a, b) => a + b, 0) / xs.length
      assert.isBelow(mean(curve.slice(-3)), 0.5 * mean(curve.slice(0, 3)), curve.map((x) => x.toFixed(3)).join(" "))
      const [start, end] = yield* Effect.all([parentDir, out].map((folder) => Safetensors.open(path.join(folder, "model.safetensors"))))
      for (const name of start.names.filter((name) => name.startsWith("model.vision_tower.") || name.startsWith("model.multi_modal_projector."))) {
        assert.deepStrictEqual(yield* end.readFloat32(name), yield* start.readFloat32(name), name)
      }
      // A model without eyes cannot take the chats.
      const error = yield* sft({
        modelDir: at("assets/parent"), data: lines, out: path.join(dir, "blind"), seq: 64, steps: 1, seed: 1, batch: 4, accumulate: 1, learningRate: 1e-3,
        minLearningRate: 1e-3, warmupSteps: 0, weightDecay: 0, maxGradNorm: 1, distillWeight: 0, saveEvery: 100
      }).pipe(Effect.scoped, Effect.flip)
      assert.match(error.message, /chats\.jsonl:1\b.*has images but the model has no image side/)
    }).pipe(onBackend("wasm")), { timeout: 120_000 })

  it.effect("GRPO on counting questions with pictures: rollouts and the policy's loss see them (most samples right, every one scored)", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const prompts = path.join(dir, "count.jsonl")
      fs.writeFileSync(prompts, jsonLines(path.join(world, "count.jsonl")).slice(0, 16).map((task: any) =>
        JSON.stringify({ prompt: task.prompt, task: { kind: "numeric", answer: task.answer }, images: task.images.map((image: string) => path.join(world, image)) })
      ).join("\n") + "\n")
      const out = path.join(dir, "grpo")
      yield* grpo({
        modelDir: parentDir, prompts, out, steps: 2, seed: 1, batch: 4, group: 4, maxNewTokens: 4, temperature: 1, loop: defaultLoop,
        loss: { epsLow: 0.2, epsHigh: 0.28, klCoef: 0 }, std: "group", updates: 1, microBatch: 2, learningRate: 1e-5, weightDecay: 0, maxGradNorm: 1, saveEvery: 100
      }).pipe(Effect.scoped, Effect.provide(RewardSources.layer()))
      const steps = fs.readFileSync(path.join(out, "metrics.jsonl"), "utf8").trim().split("\n").map((line) => JSON.parse(line) as GrpoMetrics)
      assert.strictEqual(steps.length, 2)
      for (const step of steps) {
        assert.strictEqual(step.unscored, 0)
        assert.isAtLeast(step.accuracy ?? 0, 0.6, JSON.stringify(step))
      }
    }).pipe(onBackend("wasm")), { timeout: 120_000 })

  it.effect("the server takes image_url parts (base64 data URLs) in chats: the greedy answer the engine gives the same prompt, and a 400 naming what is wrong", () =>
    Effect.gen(function*() {
      const model = yield* Pretrained.load(parentDir)
      const tokenizer = yield* Tokenizer.load(parentDir)
      const images = yield* ImageSide.of(parentDir, tokenizer)
      const scope = yield* Effect.scope
      const serve = (served: Server.Served) =>
        Layer.buildWithScope(Server.layer(served, { host: "127.0.0.1", port: 0, logRequests: false }), scope).pipe(
          Effect.map((services) => `${HttpServer.formatAddress(Context.get(services, HttpServer.HttpServer).address)}/v1/chat/completions`)
        )
      const url = yield* serve({ model, tokenizer, name: "parent-vl", images })
      const before = tf.memory().numTensors
      const post = (to: string, body: unknown) =>
        Effect.promise(async () => {
          const response = await fetch(to, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) })
          return { status: response.status, json: (await response.json()) as any }
        })
      const tasks = yield* Tasks.read(path.join(world, "eval.jsonl"), { limit: 4 })
      const dataUrl = (file: string) => `data:image/png;base64,${fs.readFileSync(file).toString("base64")}`
      const chat = (question: string, image: string) => ({
        model: "parent-vl",
        temperature: 0,
        max_tokens: 4,
        messages: [{ role: "user", content: [{ type: "image_url", image_url: { url: image } }, { type: "text", text: question }] }]
      })
      for (const task of tasks) {
        const question = task.prompt.replace("[IMG]", "")
        const reply = yield* post(url, chat(question, dataUrl(task.images![0])))
        assert.strictEqual(reply.status, 200, JSON.stringify(reply.json))
        const expected = yield* continuations(model, tokenizer, images, { ...greedyOptions(tokenizer), maxNewTokens: 4, stopStrings: [] })([`[INST] [IMG]${question} [/INST]`], [task])
        assert.strictEqual(reply.json.choices[0].message.content, expected[0])
      }
      // The batch's copies of the features are freed after the prompts' pass, the request's own with the request.
      assert.strictEqual(tf.memory().numTensors, before, "the pictures' features are all freed")
      const fetched = yield* post(url, chat("How many shapes are in the picture?", "https://example.com/a.png"))
      assert.deepStrictEqual([fetched.status, fetched.json.error.message], [400, "Image 1 is not a base64 data: URL (the server fetches nothing)."])
      const corrupt = yield* post(url, chat("How many shapes are in the picture?", "data:image/png;base64,aGVsbG8="))
      assert.strictEqual(corrupt.status, 400)
      assert.match(corrupt.json.error.message, /^image 1: /)
      const placeholder = yield* post(url, { model: "parent-vl", max_tokens: 2, messages: [{ role: "user", content: "[IMG]How many shapes are in the picture?" }] })
      assert.strictEqual(placeholder.status, 400)
      assert.match(placeholder.json.error.message, /holds 1 image placeholders .* but no image/)
      const blind = yield* serve({ model, tokenizer, name: "parent-vl", images: undefined })
      const refused = yield* post(blind, chat("How many shapes are in the picture?", dataUrl(tasks[0].images![0])))
      assert.strictEqual(refused.status, 400)
      assert.match(refused.json.error.message, /has no image side/)
    }).pipe(onBackend("wasm"), Effect.provide(Logger.layer([]))), { timeout: 120_000 })
})


/**
 * A Mistral 3 model's image side against transformers (test/fixtures/vision, made by
 * scripts/make-vision-fixtures.py): the vision encoder's features of each image, the projected
 * features, the embeddings with them spliced in at the image tokens, and the logits, on random tiny
 * models (one with projector biases, one whose text model is a Ministral 3 with YaRN) and prompts of
 * one square image, one oblong, two images of different shapes, and one long enough for Ministral 3's
 * query scaling.
 */
import { assert, describe, it } from "@effect/vitest"
import * as tf from "@tensorflow/tfjs"
import { Effect } from "effect"
import * as fs from "node:fs"
import * as path from "node:path"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Reference from "../src/io/Reference.ts"
import * as Safetensors from "../src/io/Safetensors.ts"
import * as Model from "../src/model/Model.ts"
import * as Vision from "../src/model/Vision.ts"
import * as Dataset from "../src/data/Dataset.ts"
import { calibrate } from "../stages/Calibrate.ts"
import { distill } from "../stages/Distill.ts"
import { evaluate } from "../stages/Evaluate.ts"
import * as ImageSide from "../src/data/ImageSide.ts"
import * as Teacher from "../layers/Teacher.ts"
import { trainProjector } from "../stages/ProjectorTrain.ts"
import { writeCache } from "../stages/TeacherCache.ts"
import { prune } from "../stages/Prune.ts"
import { localFixture, markovData, onBackend, tempDir } from "./support.ts"

const models = ["vl-tiny", "vl-bias", "vl-ministral3"]
const prompts = (model: string) =>
  fs.readdirSync(localFixture(`vision/${model}`)).filter((file) => /^reference-.*\.safetensors$/.test(file)).sort()

/** The parent's calibration statistics on Markov data, in `dir/stats`; the data is the one distillation reads too. */
const calibrated = (parentDir: string, dir: string) =>
  Effect.gen(function*() {
    const data = yield* markovData(path.join(dir, "train.jsonl"), 48, 40, 1)
    const stats = path.join(dir, "stats")
    yield* calibrate(yield* Pretrained.load(parentDir), { modelDir: parentDir, data, out: stats, seq: 32 })
    return { data, stats }
  })

/** These tests' distillation: KL alone, no warmup, no checkpoint before the end. */
const distillOptions = (studentDir: string, data: string, out: string, seq: number, steps: number, learningRate: number, minLearningRate: number) => ({
  studentDir, data, out, seq, steps, seed: 1, batch: 2, accumulate: 1, learningRate, minLearningRate, warmupSteps: 0, weightDecay: 0,
  maxGradNorm: 1, loss: { temperature: 1, crossEntropyWeight: 0, restBucket: false, maxOutsideMass: 1e-3 }, saveEvery: 100
})

describe("Vision", () => {
  for (const model of models) {
    for (const prompt of prompts(model)) {
      it.effect(`${model} ${prompt}: encoder features, projected features, spliced embeddings and logits within 1e-4 of transformers'`, () =>
        Effect.gen(function*() {
          const dir = localFixture(`vision/${model}`)
          const text = yield* Pretrained.load(dir)
          const vision = yield* Vision.load(dir)
          const before = tf.memory().numTensors
          const diff = yield* Reference.compareImages(text, vision, path.join(dir, prompt))
          for (const [i, encoded] of diff.encoded.entries()) assert.isAtMost(encoded, 1e-4, `image ${i}'s encoder features`)
          assert.isAtMost(diff.projected, 1e-4, "projected features")
          assert.isAtMost(diff.embeddings, 1e-4, "embeddings after splicing")
          assert.isAtMost(diff.logits, 1e-4, "logits")
          assert.strictEqual(tf.memory().numTensors, before)
        }).pipe(onBackend("wasm")))
    }
  }

  it.effect("saved with its image side, a Mistral3ForConditionalGeneration comes back with the same tensors and the same logits", () =>
    Effect.gen(function*() {
      const dir = localFixture("vision/vl-bias")
      const prompt = "reference-two-16x8-8x16.safetensors"
      const out = path.join(yield* tempDir, "vl-bias")
      yield* Pretrained.save(out, yield* Pretrained.load(dir), { dtype: "F32", vision: yield* Vision.load(dir) })
      const [original, saved] = yield* Effect.all([dir, out].map((folder) => Safetensors.open(path.join(folder, "model.safetensors"))))
      assert.deepStrictEqual([...saved.names].sort(), [...original.names].sort())
      for (const name of original.names) assert.deepStrictEqual(yield* saved.readFloat32(name), yield* original.readFloat32(name), name)
      const config = JSON.parse(fs.readFileSync(path.join(out, "config.json"), "utf8")) as Record<string, unknown>
      const fixture = JSON.parse(fs.readFileSync(path.join(dir, "config.json"), "utf8")) as Record<string, unknown>
      assert.deepStrictEqual([config.architectures, config.model_type, config.vision_config, config.image_token_index], [fixture.architectures, fixture.model_type, fixture.vision_config, fixture.image_token_index])
      const diff = yield* Reference.compareImages(yield* Pretrained.load(out), yield* Vision.load(out), path.join(dir, prompt))
      assert.isAtMost(Math.max(...diff.encoded, diff.projected, diff.logits), 1e-4)
    }).pipe(onBackend("wasm")))

  it.effect("pruning turns the projector with the text model: a full-rank rotation keeps the logits on image prompts, a narrower child is a Mistral3ForConditionalGeneration", () =>
    Effect.gen(function*() {
      const parentDir = localFixture("vision/vl-bias")
      const dir = yield* tempDir
      const { data, stats } = yield* calibrated(parentDir, dir)
      const rotated = path.join(dir, "rotated")
      yield* prune({ modelDir: parentDir, statsDir: stats, out: rotated, targets: { hidden: 48 } })
      for (const prompt of prompts("vl-bias")) {
        const diff = yield* Reference.compareImages(yield* Pretrained.load(rotated), yield* Vision.load(rotated), path.join(parentDir, prompt))
        assert.isAtMost(diff.logits, 1e-4, `${prompt}: logits after a full-rank rotation`)
      }
      const narrow = path.join(dir, "narrow")
      yield* prune({ modelDir: parentDir, statsDir: stats, out: narrow, targets: { hidden: 32, layers: 1 } })
      const config = JSON.parse(fs.readFileSync(path.join(narrow, "config.json"), "utf8")) as { architectures: Array<string>; text_config: { hidden_size: number } }
      assert.deepStrictEqual([config.architectures, config.text_config.hidden_size], [["Mistral3ForConditionalGeneration"], 32])
      const child = yield* Vision.load(narrow)
      const features = Vision.imageFeatures(child, [tf.zeros([3, 16, 16]) as tf.Tensor3D], [[16, 16]])
      assert.deepStrictEqual(features.projected.shape, [4, 32])
      tf.dispose([...features.encoded, features.projected])
      // Distilled from the parent (text only), the child stays whole: its image side saved along, unchanged.
      const distilled = path.join(dir, "distilled")
      yield* distill(distillOptions(narrow, data, distilled, 32, 2, 1e-3, 1e-4)).pipe(Effect.scoped, Effect.provide(Teacher.inProcess(parentDir)))
      const [before, after] = yield* Effect.all([narrow, distilled].map((folder) => Safetensors.open(path.join(folder, "model.safetensors"))))
      const visionNames = before.names.filter((name) => name.startsWith("vision_tower.") || name.startsWith("multi_modal_projector."))
      assert.isAbove(visionNames.length, 0)
      for (const name of visionNames) assert.deepStrictEqual(yield* after.readFloat32(name), yield* before.readFloat32(name), name)
    }).pipe(onBackend("wasm")), { timeout: 120_000 })

  it.effect("distillation on lines with images: student and teacher each see them through their own image side, text targets only", () =>
    Effect.gen(function*() {
      const parentDir = localFixture("vision/vl-tiny")
      const data = localFixture("vision/eval/data.jsonl")
      const dir = yield* tempDir
      const run = (studentDir: string, out: string, steps: number) =>
        distill(distillOptions(studentDir, data, out, 64, steps, 3e-3, 3e-3)).pipe(Effect.scoped, Effect.provide(Teacher.inProcess(parentDir)))
      const klOf = (out: string) => fs.readFileSync(path.join(out, "metrics.jsonl"), "utf8").trim().split("\n").map((line) => (JSON.parse(line) as { kl: number }).kl)
      // The parent as its own student: KL 0 only where both splice the same features at the same tokens.
      yield* run(parentDir, path.join(dir, "self"), 1)
      assert.isAtMost(klOf(path.join(dir, "self"))[0], 1e-6, "the parent against itself")
      // A pruned child learns the parent's distributions on these lines; its image side stays as it was.
      const { stats } = yield* calibrated(parentDir, dir)
      const child = path.join(dir, "child")
      yield* prune({ modelDir: parentDir, statsDir: stats, out: child, targets: { hidden: 32, layers: 1 } })
      yield* run(child, path.join(dir, "distilled"), 16)
      const curve = klOf(path.join(dir, "distilled"))
      assert.isBelow(curve.slice(-2).reduce((a, b) => a + b) / 2, 0.8 * ((curve[0] + curve[1]) / 2), curve.map((kl) => kl.toFixed(3)).join(" "))
      const [before, after] = yield* Effect.all([child, path.join(dir, "distilled")].map((folder) => Safetensors.open(path.join(folder, "model.safetensors"))))
      for (const name of before.names.filter((name) => !name.startsWith("language_model.") && !name.startsWith("lm_head."))) {
        assert.deepStrictEqual(yield* after.readFloat32(name), yield* before.readFloat32(name), name)
      }
      // A text-only student cannot read the lines.
      const blind = path.join(dir, "blind")
      yield* Pretrained.save(blind, yield* Pretrained.load(child), { dtype: "F32" })
      const error = yield* run(blind, path.join(dir, "blind-out"), 1).pipe(Effect.flip)
      assert.match(error.message, /data\.jsonl:1\b.*has images but the model has no image side/)
    }).pipe(onBackend("wasm")), { timeout: 120_000 })

  it.effect("images where they cannot go: a teacher cache refuses lines with images, a remote teacher rows with images, each naming what", () =>
    Effect.gen(function*() {
      const parentDir = localFixture("vision/vl-tiny")
      const data = localFixture("vision/eval/data.jsonl")
      const dir = yield* tempDir
      const cached = yield* writeCache({ teacherDir: parentDir, data, out: path.join(dir, "cache"), seq: 64, topK: 4 }).pipe(Effect.provide(Teacher.inProcess(parentDir, { topK: 4 })), Effect.flip)
      assert.match(cached.message, /data\.jsonl:1\b.*has images, which a teacher cache does not hold/)
      // Refused before any request: nothing listens on the port.
      const remote = yield* distill(distillOptions(parentDir, data, path.join(dir, "remote"), 64, 1, 1e-3, 1e-3)).pipe(Effect.scoped, Effect.provide(Teacher.remote(["http://127.0.0.1:9"], { topK: 4, retries: 0 })), Effect.flip)
      assert.match(remote.message, /rows have images, which a remote teacher is not sent/)
    }).pipe(onBackend("wasm")))

  it.effect("the projector-only step brings a pruned child's distributions on image prompts toward its parent's, the encoder and the text model untouched", () =>
    Effect.gen(function*() {
      const parentDir = localFixture("vision/vl-tiny")
      const dir = yield* tempDir
      const { stats } = yield* calibrated(parentDir, dir)
      const child = path.join(dir, "child")
      yield* prune({ modelDir: parentDir, statsDir: stats, out: child, targets: { hidden: 32, layers: 1 } })
      const out = path.join(dir, "projected")
      const result = yield* trainProjector({ studentDir: child, teacherDir: parentDir, data: localFixture("vision/eval/data.jsonl"), out, steps: 60, learningRate: 1e-2 })
      assert.isBelow(result.klAfter, 0.8 * result.klBefore, JSON.stringify(result))
      const [before, after] = yield* Effect.all([child, out].map((folder) => Safetensors.open(path.join(folder, "model.safetensors"))))
      for (const name of before.names) {
        const same = Reference.maxAbsDiff(yield* after.readFloat32(name), yield* before.readFloat32(name)) === 0
        assert.strictEqual(same, !name.startsWith("multi_modal_projector."), `${name} ${same ? "unchanged" : "changed"}`)
      }
    }).pipe(onBackend("wasm")), { timeout: 120_000 })

  it.effect("the projector step's KL is the same with lines of different lengths in one right-padded batch as one at a time, and the step leaves no tensor behind", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const options = { studentDir: localFixture("vision/vl-bias"), teacherDir: localFixture("vision/vl-tiny"), data: localFixture("vision/eval/data.jsonl"), learningRate: 1e-2 }
      const before = tf.memory().numTensors
      const alone = yield* trainProjector({ ...options, out: path.join(dir, "alone"), steps: 0, batch: 1 }).pipe(Effect.scoped)
      const together = yield* trainProjector({ ...options, out: path.join(dir, "together"), steps: 2, batch: 3 }).pipe(Effect.scoped)
      assert.isAbove(alone.klBefore, 0)
      assert.approximately(together.klBefore, alone.klBefore, 1e-5 * alone.klBefore)
      assert.strictEqual(tf.memory().numTensors, before)
    }).pipe(onBackend("wasm")))

  it.effect("a text model narrower than its image side's projection is not saved with it", () =>
    Effect.gen(function*() {
      const vision = yield* Vision.load(localFixture("vision/vl-tiny"))
      const narrower = yield* Pretrained.load(localFixture("mistral-headdim"))
      const error = yield* Pretrained.save(path.join(yield* tempDir, "x"), narrower, { dtype: "F32", vision }).pipe(Effect.flip)
      assert.match(error.message, /projects into 48 dimensions, the text model has \d+/)
    }).pipe(onBackend("wasm")))

  it.effect("cascade eval on lines with images: the NLL transformers gives, image tokens as inputs only (PNG files, the processor's settings from preprocessor_config.json)", () =>
    Effect.gen(function*() {
      const data = localFixture("vision/eval/data.jsonl")
      const expected = JSON.parse(fs.readFileSync(localFixture("vision/eval/expected.json"), "utf8")) as { models: Record<string, { nll: number; tokens: number }> }
      for (const name of ["vl-tiny", "vl-ministral3"]) {
        const dir = localFixture(`vision/${name}`)
        const model = yield* Pretrained.load(dir)
        const images = yield* ImageSide.of(dir, undefined)
        const result = yield* evaluate(model, Dataset.sequences(data, { vocabSize: model.config.vocabSize }), { file: data, images, batchSize: 3 })
        assert.strictEqual(result.tokens, expected.models[name].tokens, name)
        assert.approximately(result.nll, expected.models[name].nll, 1e-5, name)
      }
    }).pipe(onBackend("wasm")))

  it.effect("a line with images fails naming its line: images and placeholders that do not pair, or a model with no image side", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const data = path.join(dir, "data.jsonl")
      const image = localFixture("vision/processor/images/gradient-w37-h23.png")
      fs.writeFileSync(data, [JSON.stringify({ input_ids: [1, 5, 6] }), JSON.stringify({ input_ids: [1, 10, 5, 10], images: [image] })].join("\n"))
      const vlDir = localFixture("vision/vl-tiny")
      const model = yield* Pretrained.load(vlDir)
      const unpaired = yield* evaluate(model, Dataset.sequences(data, { vocabSize: 512 }), { file: data, images: yield* ImageSide.of(vlDir, undefined) }).pipe(Effect.flip)
      assert.match(unpaired.message, /data\.jsonl:2\b.*1 images but 2 image placeholders/)
      // A placeholder with no image at all would take another line's features in a shared batch.
      const lone = path.join(dir, "lone.jsonl")
      fs.writeFileSync(lone, JSON.stringify({ input_ids: [1, 10, 5] }) + "\n")
      const orphan = yield* evaluate(model, Dataset.sequences(lone, { vocabSize: 512 }), { file: lone, images: yield* ImageSide.of(vlDir, undefined) }).pipe(Effect.flip)
      assert.match(orphan.message, /lone\.jsonl:1\b.*1 image placeholders \(id 10\) but no images/)
      const textOnly = yield* Pretrained.load(localFixture("mistral-headdim"))
      const blind = yield* evaluate(textOnly, Dataset.sequences(data, { vocabSize: 512 }), { file: data, images: yield* ImageSide.of(localFixture("mistral-headdim"), undefined) }).pipe(Effect.flip)
      assert.match(blind.message, /data\.jsonl:2\b.*has images but the model has no image side/)
    }).pipe(onBackend("wasm")))

  it.effect("a prompt whose image tokens do not match the features is refused, naming both counts", () =>
    Effect.gen(function*() {
      const dir = localFixture("vision/vl-tiny")
      const text = yield* Pretrained.load(dir)
      const features = tf.zeros([3, text.config.hiddenSize]) as tf.Tensor2D
      const error = (() => {
        try {
          Model.forward(text, [[1, 10, 10, 5]], { imageFeatures: { features, tokenId: 10 } })
        } catch (cause) {
          return cause as Error
        }
      })()
      features.dispose()
      assert.match(String(error?.message), /2 image tokens but 3 image feature rows/)
    }).pipe(onBackend("wasm")))
})

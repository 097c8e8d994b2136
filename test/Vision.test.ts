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
import * as Model from "../src/model/Model.ts"
import * as Vision from "../src/model/Vision.ts"
import { localFixture, onBackend } from "./support.ts"

const models = ["vl-tiny", "vl-bias", "vl-ministral3"]
const prompts = (model: string) =>
  fs.readdirSync(localFixture(`vision/${model}`)).filter((file) => /^reference-.*\.safetensors$/.test(file)).sort()

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

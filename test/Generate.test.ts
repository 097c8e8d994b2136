import { assert, describe, it } from "@effect/vitest"
import * as tf from "@tensorflow/tfjs"
import { Effect, Exit } from "effect"
import * as Generate from "../src/model/Generate.ts"
import * as Model from "../src/model/Model.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Tokenizer from "../src/io/Tokenizer.ts"
import { onBackend, sharedFixture, take } from "./support.ts"

/** Prompts of different lengths, so that a batch of them is padded. */
const prompts = [[1, 58, 321, 361], [1, 294, 32], [1, 3, 344, 355, 363, 227, 4]]

/** Log-softmax in float64 of one row of logits. */
const logSoftmax = (logits: ArrayLike<number>): Array<number> => {
  const max = Math.max(...Array.from(logits))
  const logSum = Math.log(Array.from(logits).reduce((sum, logit) => sum + Math.exp(logit - max), 0))
  return Array.from(logits, (logit) => logit - max - logSum)
}

/** Ids of the k largest values, largest first. */
const topIds = (values: ReadonlyArray<number>, k: number) =>
  values.map((value, id) => ({ value, id })).sort((a, b) => b.value - a.value).slice(0, k).map(({ id }) => id)

/** Runs a test with the fixture model, checking that it leaves no tensor behind. */
const withModel = <A, E, R>(test: (model: Model.Model) => Effect.Effect<A, E, R>) =>
  Effect.gen(function*() {
    const model = yield* Pretrained.load(sharedFixture("tiny-mistral"))
    const before = tf.memory().numTensors
    yield* test(model)
    assert.strictEqual(tf.memory().numTensors, before, "generation leaves no tensors behind")
  }).pipe(onBackend("wasm"))

describe("Generate", () => {
  it.effect("greedy generation of a padded batch equals each prompt alone", () =>
    withModel((model) =>
      Effect.gen(function*() {
        const options = { maxNewTokens: 24, temperature: 0, topLogprobs: 3 }
        const batch = yield* Generate.generate(model, prompts, options)
        for (const [i, prompt] of prompts.entries()) {
          const [alone] = yield* Generate.generate(model, [prompt], options)
          assert.deepStrictEqual(batch[i].tokens, alone.tokens)
          assert.strictEqual(batch[i].finishReason, "length")
          batch[i].logprobs.forEach((scored, j) => {
            assert.closeTo(scored.logprob, alone.logprobs[j].logprob, 1e-5)
            assert.deepStrictEqual(scored.top.map(({ token }) => token), alone.logprobs[j].top.map(({ token }) => token))
          })
        }
      })
    ))

  it.effect("with the KV cache it equals re-running the full forward pass every step", () =>
    withModel((model) =>
      Effect.gen(function*() {
        const [generation] = yield* Generate.generate(model, [prompts[2]], { maxNewTokens: 16, temperature: 0, topLogprobs: 3 })
        const sequence = [...prompts[2]]
        for (const scored of generation.logprobs) {
          const logits = take(Model.forward(model, [sequence]).logits)
          const v = model.config.vocabSize
          const logProbs = logSoftmax(logits.subarray((sequence.length - 1) * v))
          const [best] = topIds(logProbs, 1)
          assert.strictEqual(scored.token, best)
          assert.closeTo(scored.logprob, logProbs[best], 1e-5)
          assert.strictEqual(scored.rank, 1)
          assert.deepStrictEqual(scored.top.map(({ token }) => token), topIds(logProbs, 3))
          sequence.push(best)
        }
      })
    ))

  it.effect("prompt log-probs are the log-softmax of the forward pass's logits, with vLLM's ranks", () =>
    withModel((model) =>
      Effect.gen(function*() {
        const batch = yield* Generate.generate(model, prompts, { maxNewTokens: 0, promptLogprobs: 4 })
        for (const [i, prompt] of prompts.entries()) {
          const logits = take(Model.forward(model, [prompt]).logits)
          const v = model.config.vocabSize
          const scores = batch[i].promptLogprobs!
          assert.strictEqual(scores.length, prompt.length)
          assert.isUndefined(scores[0])
          for (let j = 1; j < prompt.length; j++) {
            const logProbs = logSoftmax(logits.subarray((j - 1) * v, j * v))
            const scored = scores[j]!
            assert.strictEqual(scored.token, prompt[j])
            assert.closeTo(scored.logprob, logProbs[prompt[j]], 1e-5)
            assert.strictEqual(scored.rank, logProbs.filter((logProb) => logProb >= logProbs[prompt[j]]).length)
            assert.deepStrictEqual(scored.top.map(({ token }) => token), topIds(logProbs, 4))
            scored.top.forEach(({ token, logprob }) => assert.closeTo(logprob, logProbs[token], 1e-5))
          }
        }
        assert.deepStrictEqual(batch.map((generation) => generation.tokens), [[], [], []])
      })
    ))

  it.effect("the same seed gives the same samples; top-p near 0 is greedy", () =>
    withModel((model) =>
      Effect.gen(function*() {
        const sampling = { maxNewTokens: 12, temperature: 1.2, topP: 0.9 }
        const first = yield* Generate.generate(model, prompts, { ...sampling, seed: 7 })
        const again = yield* Generate.generate(model, prompts, { ...sampling, seed: 7 })
        const other = yield* Generate.generate(model, prompts, { ...sampling, seed: 8 })
        assert.deepStrictEqual(first.map((g) => g.tokens), again.map((g) => g.tokens))
        assert.notDeepEqual(first.map((g) => g.tokens), other.map((g) => g.tokens))
        const narrow = yield* Generate.generate(model, prompts, { maxNewTokens: 12, temperature: 1, topP: 1e-6, seed: 1 })
        const greedy = yield* Generate.generate(model, prompts, { maxNewTokens: 12, temperature: 0 })
        assert.deepStrictEqual(narrow.map((g) => g.tokens), greedy.map((g) => g.tokens))
      })
    ))

  it.effect("stops at a stop token or a stop string, cutting the text", () =>
    withModel((model) =>
      Effect.gen(function*() {
        const tokenizer = yield* Tokenizer.load(sharedFixture("tiny-bpe/tokenizer.json"))
        const decode = (ids: ReadonlyArray<number>) => tokenizer.decode(ids, { skipSpecialTokens: true })
        const greedy = { maxNewTokens: 10, temperature: 0, decode }
        const [full] = yield* Generate.generate(model, [prompts[1]], greedy)
        const stopToken = full.tokens[3]
        const [byToken] = yield* Generate.generate(model, [prompts[1]], { ...greedy, stopTokenIds: [stopToken] })
        const cut = full.tokens.indexOf(stopToken) + 1
        assert.deepStrictEqual(byToken.tokens, full.tokens.slice(0, cut))
        assert.strictEqual(byToken.finishReason, "stop")
        assert.strictEqual(byToken.stopReason, stopToken)
        assert.strictEqual(byToken.text, decode(full.tokens.slice(0, cut - 1)))

        const stop = full.text!.slice(4, 6)
        const [byString] = yield* Generate.generate(model, [prompts[1]], { ...greedy, stopStrings: ["never there", stop] })
        assert.strictEqual(byString.finishReason, "stop")
        assert.strictEqual(byString.stopReason, stop)
        assert.strictEqual(byString.text, full.text!.slice(0, full.text!.indexOf(stop)))
        assert.isBelow(byString.tokens.length, full.tokens.length)
      })
    ))

  it.effect("flags a loop, and stops on it when asked", () =>
    withModel((model) =>
      Effect.gen(function*() {
        const loop = { window: 8, maxPeriod: 4 }
        const [flagged] = yield* Generate.generate(model, [[1]], { maxNewTokens: 40, temperature: 0, loop })
        assert.strictEqual(flagged.finishReason, "length")
        assert.strictEqual(flagged.tokens.length, 40)
        assert.isDefined(flagged.loopPeriod)
        const [stopped] = yield* Generate.generate(model, [[1]], { maxNewTokens: 40, temperature: 0, loop: { ...loop, stop: true } })
        assert.strictEqual(stopped.finishReason, "loop")
        assert.deepStrictEqual(stopped.tokens, flagged.tokens.slice(0, stopped.tokens.length))
        assert.strictEqual(Generate.loopPeriod(stopped.tokens, loop), flagged.loopPeriod)
        assert.isUndefined(Generate.loopPeriod(stopped.tokens.slice(0, -1), loop))
      })
    ))

  // Live: the timeout needs the real clock.
  it.live("an interrupted generation releases its tensors", () =>
    withModel((model) =>
      Effect.gen(function*() {
        const exit = yield* Generate.generate(model, prompts, { maxNewTokens: 1000, temperature: 1 }).pipe(
          Effect.timeout("30 millis"),
          Effect.exit
        )
        assert.isTrue(Exit.isFailure(exit))
      })
    ))

  it("loopPeriod finds the shortest cycle of the last tokens", () => {
    const options = { window: 6, maxPeriod: 3 }
    assert.strictEqual(Generate.loopPeriod([9, 1, 1, 1, 1, 1, 1], options), 1)
    assert.strictEqual(Generate.loopPeriod([9, 1, 2, 1, 2, 1, 2], options), 2)
    assert.strictEqual(Generate.loopPeriod([1, 2, 3, 1, 2, 3], options), 3)
    assert.isUndefined(Generate.loopPeriod([1, 2, 3, 1, 2, 4], options))
    assert.isUndefined(Generate.loopPeriod([1, 1, 1], options), "fewer tokens than the window")
    assert.isUndefined(Generate.loopPeriod([1, 2, 3, 4, 1, 2, 3, 4], { window: 6, maxPeriod: 4 }), "a cycle must show twice")
  })

  it("splitThinking separates [THINK] chunks from the answer", () => {
    assert.deepStrictEqual(Generate.splitThinking("[THINK]a b[/THINK]The answer."), { thinking: ["a b"], answer: "The answer." })
    assert.deepStrictEqual(Generate.splitThinking("x[THINK]1[/THINK]y[THINK]2[/THINK]z"), { thinking: ["1", "2"], answer: "xyz" })
    assert.deepStrictEqual(Generate.splitThinking("plain"), { thinking: [], answer: "plain" })
    assert.deepStrictEqual(Generate.splitThinking("ok[THINK]cut off"), { thinking: ["cut off"], answer: "ok" })
    assert.deepStrictEqual(Generate.splitThinking("opened by the prompt[/THINK]answer"), {
      thinking: ["opened by the prompt"],
      answer: "answer"
    })
  })
})

import { Effect } from "effect"
import { TensorBackend } from "../layers/TensorBackend.ts"
import * as Config from "../src/model/Config.ts"
import * as Model from "../src/model/Model.ts"
import * as Training from "../src/train/Training.ts"
const [vocab, hidden] = [Number(process.argv[2]), Number(process.argv[3])]
const ids = [[0, 65535 % vocab, vocab - 1], [65536 % vocab, vocab - 2, 5]]
const logits = (backend: "cpu" | "wasm") => Effect.gen(function*() {
  const config = yield* Config.decode({ model_type: "mistral", vocab_size: vocab, hidden_size: hidden, intermediate_size: 256, num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 64, rms_norm_eps: 1e-5, sliding_window: null, tie_word_embeddings: true, rope_parameters: { rope_type: "default", rope_theta: 1e6 } }, "wide")
  const made = yield* Training.initialise(config, 0)
  const { logits } = Model.forward(made, ids)
  return (yield* Effect.promise(() => logits.data())) as Float32Array
}).pipe(Effect.scoped, Effect.provide(TensorBackend.layer(backend)))
const program = Effect.gen(function*() {
  const a = yield* logits("cpu"), b = yield* logits("wasm")
  let d = 0; for (let i = 0; i < a.length; i++) d = Math.max(d, Math.abs(a[i] - b[i]))
  console.log(vocab, hidden, "cpu vs wasm", d, "sample", a[0], b[0])
})
await Effect.runPromise(program)
process.exit(0)

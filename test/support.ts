/** Shared helpers of the test suite: fixture paths, references, comparisons. */
import { Effect } from "effect"
import { fileURLToPath } from "node:url"
import { type BackendName, TensorBackend } from "../layers/TensorBackend.ts"

/** The read-only fixtures made with transformers, in ../shared beside the repository. */
export const sharedFixture = (name: string) => fileURLToPath(new URL(`../../shared/fixtures/${name}`, import.meta.url))

/** Fixtures this repository keeps (made by scripts/make_references.py). */
export const localFixture = (name: string) => fileURLToPath(new URL(`./fixtures/${name}`, import.meta.url))

export { maxAbsDiff, take } from "../src/Reference.ts"

/** Runs a test on a backend; the test's own resources (models) are released before the backend is. */
export const onBackend = (backend: BackendName) => <A, E, R>(effect: Effect.Effect<A, E, R>) =>
  effect.pipe(Effect.scoped, Effect.provide(TensorBackend.layer(backend)))

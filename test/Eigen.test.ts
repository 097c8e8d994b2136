import { assert, describe, it } from "@effect/vitest"
import { Schema } from "effect"
import { symmetricEigen } from "../src/prune/Eigen.ts"

/** A seeded symmetric matrix X^T X (positive semi-definite, rank <= rows) or a general symmetric one. */
const randomSymmetric = (n: number, seed: number, rows?: number) => {
  let state = seed >>> 0 || 1
  const next = () => {
    state ^= state << 13
    state ^= state >>> 17
    state ^= state << 5
    return ((state >>> 0) / 2 ** 32) * 2 - 1
  }
  const m = new Float64Array(n * n)
  if (rows === undefined) {
    for (let i = 0; i < n; i++) for (let j = 0; j <= i; j++) m[i * n + j] = m[j * n + i] = next()
    return m
  }
  const x = Float64Array.from({ length: rows * n }, next)
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < n; j++) {
      let sum = 0
      for (let r = 0; r < rows; r++) sum += x[r * n + i] * x[r * n + j]
      m[i * n + j] = sum
    }
  }
  return m
}

describe("symmetricEigen", () => {
  it.prop(
    "A V = V diag(values), V orthonormal, values descending",
    {
      n: Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 24 })),
      seed: Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 1_000_000 })),
      rows: Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 30 }))
    },
    ({ n, seed, rows }) => {
      // rows 0 stands for a general (indefinite) symmetric matrix; otherwise a Gram matrix, possibly rank-deficient.
      const a = randomSymmetric(n, seed, rows === 0 ? undefined : rows)
      const { values, vectors } = symmetricEigen(a, n)
      const scale = Math.max(1, ...Array.from(a, Math.abs))
      for (let i = 0; i < n; i++) {
        if (i > 0) assert.isAtLeast(values[i - 1], values[i])
        for (let j = 0; j < n; j++) {
          let av = 0
          let vtv = 0
          for (let k = 0; k < n; k++) {
            av += a[i * n + k] * vectors[k * n + j]
            vtv += vectors[k * n + i] * vectors[k * n + j]
          }
          assert.isAtMost(Math.abs(av - vectors[i * n + j] * values[j]), 1e-9 * scale * n)
          assert.isAtMost(Math.abs(vtv - (i === j ? 1 : 0)), 1e-10 * n)
        }
      }
    },
    { arbitrary: { runs: 60 } }
  )

  it("finds the eigenvalues of a known matrix", () => {
    const { values } = symmetricEigen(Float64Array.from([2, 1, 0, 1, 2, 0, 0, 0, 5]), 3)
    assert.deepStrictEqual(Array.from(values, (x) => Math.round(x * 1e12) / 1e12), [5, 3, 1])
  })
})

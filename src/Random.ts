/**
 * Seeded randomness: the same seed gives the same numbers on every machine and backend, so that
 * initialisation, data order, sampling and random baselines replay exactly.
 */

/** mulberry32: uniform floats in [0, 1) from a 32-bit seed. */
export const uniform = (seed: number) => {
  let state = seed >>> 0
  return () => {
    state = (state + 0x6d2b79f5) >>> 0
    let x = state
    x = Math.imul(x ^ (x >>> 15), x | 1)
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61)
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296
  }
}

/** `count` normal samples of standard deviation `std` (Box-Muller) drawn from `next`. */
export const normals = (next: () => number, count: number, std: number) => {
  const values = new Float32Array(count)
  for (let i = 0; i < count; i += 2) {
    const radius = std * Math.sqrt(-2 * Math.log(1 - next()))
    const angle = 2 * Math.PI * next()
    values[i] = radius * Math.cos(angle)
    if (i + 1 < count) values[i + 1] = radius * Math.sin(angle)
  }
  return values
}

/** A seeded permutation of 0..n-1 (Fisher-Yates). */
export const permutation = (n: number, next: () => number): Array<number> => {
  const order = Array.from({ length: n }, (_, i) => i)
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(next() * (i + 1))
    ;[order[i], order[j]] = [order[j], order[i]]
  }
  return order
}

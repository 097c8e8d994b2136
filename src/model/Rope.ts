/**
 * Rotary position embeddings as transformers computes them: inverse frequencies (plain or YaRN),
 * the attention factor that scales cos and sin, and Ministral 3's position-based query scaling.
 *
 * transformers computes the frequencies in float32; `Math.fround` reproduces its rounding so that
 * angles at long positions agree to the last bit that matters.
 */
import type { ModelConfig, RopeConfig } from "./Config.ts"

export interface Rope {
  /** [headDim / 2] inverse frequencies, float32 values. */
  readonly invFreq: Float32Array
  /** Multiplies cos and sin (YaRN's mscale); 1 for plain RoPE. */
  readonly attentionFactor: number
}

export const make = (config: ModelConfig): Rope =>
  config.rope.type === "yarn"
    ? yarn(config.rope, config.headDim, config.maxPositionEmbeddings)
    : { invFreq: plainInvFreq(config.rope.theta, config.headDim), attentionFactor: 1 }

/** `base^(-2i/dim)` for i < dim/2, rounded as torch's float32 arithmetic rounds it. */
const baseFrequencies = (base: number, dim: number): Float32Array => {
  const out = new Float32Array(dim / 2)
  for (let i = 0; i < dim / 2; i++) out[i] = Math.fround(base ** Math.fround((2 * i) / dim))
  return out
}

const plainInvFreq = (base: number, dim: number): Float32Array =>
  baseFrequencies(base, dim).map((f) => Math.fround(1 / f))

const yarnMscale = (scale: number, mscale = 1) => (scale <= 1 ? 1 : 0.1 * mscale * Math.log(scale) + 1)

/**
 * YaRN (Peng et al. 2023): dimensions rotating fewer than `betaSlow` times over the original context
 * are interpolated by `factor`, those rotating more than `betaFast` times are kept, and a linear
 * ramp blends the ones between.
 */
const yarn = (rope: RopeConfig, dim: number, maxPositionEmbeddings: number): Rope => {
  const originalMax = rope.originalMaxPositionEmbeddings ?? maxPositionEmbeddings
  const factor = rope.factor
  const attentionFactor = rope.attentionFactor ??
    (rope.mscale && rope.mscaleAllDim
      ? yarnMscale(factor, rope.mscale) / yarnMscale(factor, rope.mscaleAllDim)
      : yarnMscale(factor))
  // The dimension whose wavelength completes `rotations` turns over the original context.
  const correctionDim = (rotations: number) =>
    (dim * Math.log(originalMax / (rotations * 2 * Math.PI))) / (2 * Math.log(rope.theta))
  let low = correctionDim(rope.betaFast)
  let high = correctionDim(rope.betaSlow)
  if (rope.truncate) {
    low = Math.floor(low)
    high = Math.ceil(high)
  }
  low = Math.max(low, 0)
  high = Math.min(high, dim - 1)
  if (low === high) high += 0.001 // avoids a division by zero in the ramp, as transformers does
  const base = baseFrequencies(rope.theta, dim)
  const invFreq = new Float32Array(dim / 2)
  for (let i = 0; i < dim / 2; i++) {
    const ramp = Math.min(1, Math.max(0, Math.fround((i - low) / (high - low))))
    const extrapolationWeight = Math.fround(1 - ramp)
    const extrapolated = Math.fround(1 / base[i])
    const interpolated = Math.fround(1 / Math.fround(factor * base[i]))
    invFreq[i] = Math.fround(
      Math.fround(interpolated * Math.fround(1 - extrapolationWeight)) +
        Math.fround(extrapolated * extrapolationWeight)
    )
  }
  return { invFreq, attentionFactor }
}

/**
 * cos and sin tables for `length` positions starting at `offset`, each [length, headDim] laid out as
 * transformers' `cat(freqs, freqs)`, already multiplied by the attention factor.
 */
export const tables = (rope: Rope, offset: number, length: number) => {
  const half = rope.invFreq.length
  const dim = 2 * half
  const cos = new Float32Array(length * dim)
  const sin = new Float32Array(length * dim)
  for (let t = 0; t < length; t++) {
    for (let i = 0; i < half; i++) {
      const angle = Math.fround(rope.invFreq[i] * (offset + t))
      const c = Math.fround(Math.fround(Math.cos(angle)) * rope.attentionFactor)
      const s = Math.fround(Math.fround(Math.sin(angle)) * rope.attentionFactor)
      cos[t * dim + i] = c
      cos[t * dim + half + i] = c
      sin[t * dim + i] = s
      sin[t * dim + half + i] = s
    }
  }
  return { cos, sin }
}

/**
 * Ministral 3's query scale per position, `1 + beta * ln(1 + floor(pos / originalMax))`; all ones
 * when the config has no `llama_4_scaling_beta`.
 */
export const queryScales = (config: ModelConfig, offset: number, length: number): Float32Array => {
  const scales = new Float32Array(length).fill(1)
  const beta = config.rope.llama4ScalingBeta
  if (beta === undefined) return scales
  const originalMax = config.rope.originalMaxPositionEmbeddings ?? config.maxPositionEmbeddings
  for (let t = 0; t < length; t++) {
    scales[t] = 1 + beta * Math.log(1 + Math.floor((offset + t) / originalMax))
  }
  return scales
}

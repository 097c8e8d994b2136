/**
 * Eigendecomposition of a real symmetric matrix in float64, for the PCA that pruning's rotation
 * needs: Householder reduction to tridiagonal form, then the implicit QL algorithm (the classic
 * tred2 / tql2 pair of EISPACK). O(n^3), exact to rounding, no dependency.
 */

export interface SymmetricEigen {
  /** Eigenvalues, largest first. */
  readonly values: Float64Array
  /** Eigenvectors as columns of an n x n row-major matrix, in the order of `values`. */
  readonly vectors: Float64Array
}

/** `matrix` is n x n, row-major and symmetric; it is not modified. */
export const symmetricEigen = (matrix: Float64Array, n: number): SymmetricEigen => {
  const v = Float64Array.from(matrix)
  const d = new Float64Array(n)
  const e = new Float64Array(n)
  tridiagonalize(v, d, e, n)
  diagonalize(v, d, e, n)
  const order = Array.from({ length: n }, (_, i) => i).sort((a, b) => d[b] - d[a])
  const values = Float64Array.from(order, (i) => d[i])
  const vectors = new Float64Array(n * n)
  for (let row = 0; row < n; row++) {
    for (let col = 0; col < n; col++) vectors[row * n + col] = v[row * n + order[col]]
  }
  return { values, vectors }
}

/** Householder reduction: on return v holds the orthogonal transform, d the diagonal, e the off-diagonal. */
const tridiagonalize = (v: Float64Array, d: Float64Array, e: Float64Array, n: number) => {
  const at = (i: number, j: number) => i * n + j
  for (let j = 0; j < n; j++) d[j] = v[at(n - 1, j)]
  for (let i = n - 1; i > 0; i--) {
    let scale = 0
    let h = 0
    for (let k = 0; k < i; k++) scale += Math.abs(d[k])
    if (scale === 0) {
      e[i] = d[i - 1]
      for (let j = 0; j < i; j++) {
        d[j] = v[at(i - 1, j)]
        v[at(i, j)] = 0
        v[at(j, i)] = 0
      }
    } else {
      for (let k = 0; k < i; k++) {
        d[k] /= scale
        h += d[k] * d[k]
      }
      let f = d[i - 1]
      let g = Math.sqrt(h)
      if (f > 0) g = -g
      e[i] = scale * g
      h -= f * g
      d[i - 1] = f - g
      for (let j = 0; j < i; j++) e[j] = 0
      for (let j = 0; j < i; j++) {
        f = d[j]
        v[at(j, i)] = f
        g = e[j] + v[at(j, j)] * f
        for (let k = j + 1; k <= i - 1; k++) {
          g += v[at(k, j)] * d[k]
          e[k] += v[at(k, j)] * f
        }
        e[j] = g
      }
      f = 0
      for (let j = 0; j < i; j++) {
        e[j] /= h
        f += e[j] * d[j]
      }
      const hh = f / (h + h)
      for (let j = 0; j < i; j++) e[j] -= hh * d[j]
      for (let j = 0; j < i; j++) {
        f = d[j]
        g = e[j]
        for (let k = j; k <= i - 1; k++) v[at(k, j)] -= f * e[k] + g * d[k]
        d[j] = v[at(i - 1, j)]
        v[at(i, j)] = 0
      }
    }
    d[i] = h
  }
  // Accumulate the transformations.
  for (let i = 0; i < n - 1; i++) {
    v[at(n - 1, i)] = v[at(i, i)]
    v[at(i, i)] = 1
    const h = d[i + 1]
    if (h !== 0) {
      for (let k = 0; k <= i; k++) d[k] = v[at(k, i + 1)] / h
      for (let j = 0; j <= i; j++) {
        let g = 0
        for (let k = 0; k <= i; k++) g += v[at(k, i + 1)] * v[at(k, j)]
        for (let k = 0; k <= i; k++) v[at(k, j)] -= g * d[k]
      }
    }
    for (let k = 0; k <= i; k++) v[at(k, i + 1)] = 0
  }
  for (let j = 0; j < n; j++) {
    d[j] = v[at(n - 1, j)]
    v[at(n - 1, j)] = 0
  }
  v[at(n - 1, n - 1)] = 1
  e[0] = 0
}

/** Implicit QL iterations on the tridiagonal (d, e), applying each rotation to v's columns. */
const diagonalize = (v: Float64Array, d: Float64Array, e: Float64Array, n: number) => {
  const at = (i: number, j: number) => i * n + j
  for (let i = 1; i < n; i++) e[i - 1] = e[i]
  e[n - 1] = 0
  let f = 0
  let largest = 0
  const eps = 2 ** -52
  for (let l = 0; l < n; l++) {
    largest = Math.max(largest, Math.abs(d[l]) + Math.abs(e[l]))
    let m = l
    while (m < n - 1 && Math.abs(e[m]) > eps * largest) m++
    if (m > l) {
      do {
        let g = d[l]
        let p = (d[l + 1] - g) / (2 * e[l])
        let r = Math.hypot(p, 1)
        if (p < 0) r = -r
        d[l] = e[l] / (p + r)
        d[l + 1] = e[l] * (p + r)
        const dl1 = d[l + 1]
        let h = g - d[l]
        for (let i = l + 2; i < n; i++) d[i] -= h
        f += h
        p = d[m]
        let c = 1
        let c2 = c
        let c3 = c
        const el1 = e[l + 1]
        let s = 0
        let s2 = 0
        for (let i = m - 1; i >= l; i--) {
          c3 = c2
          c2 = c
          s2 = s
          g = c * e[i]
          h = c * p
          r = Math.hypot(p, e[i])
          e[i + 1] = s * r
          s = e[i] / r
          c = p / r
          p = c * d[i] - s * g
          d[i + 1] = h + s * (c * g + s * d[i])
          for (let k = 0; k < n; k++) {
            h = v[at(k, i + 1)]
            v[at(k, i + 1)] = s * v[at(k, i)] + c * h
            v[at(k, i)] = c * v[at(k, i)] - s * h
          }
        }
        p = (-s * s2 * c3 * el1 * e[l]) / dl1
        e[l] = s * p
        d[l] = c * p
      } while (Math.abs(e[l]) > eps * largest)
    }
    d[l] += f
    e[l] = 0
  }
}

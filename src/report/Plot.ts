/**
 * Line charts as standalone SVG: enough for loss curves and retention-against-size plots in a run
 * folder, readable in any browser, with no dependency.
 */

export interface Series {
  readonly name: string
  readonly points: ReadonlyArray<readonly [number, number]>
}

export interface Chart {
  readonly title: string
  readonly x: string
  readonly y: string
  readonly series: ReadonlyArray<Series>
  /** Log-scale x axis (e.g. parameter counts). */
  readonly logX?: boolean
  /** Log-scale y axis (e.g. losses that start far above where they settle); values <= 0 are left out. */
  readonly logY?: boolean
}

const palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]

const escape = (text: string) => text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")

/** About five round tick values covering [low, high]. */
const ticks = (low: number, high: number): Array<number> => {
  const span = high - low || Math.abs(high) || 1
  const step = 10 ** Math.floor(Math.log10(span / 5))
  const unit = [1, 2, 5, 10].map((m) => m * step).find((s) => span / s <= 6) ?? 10 * step
  const out: Array<number> = []
  for (let v = Math.ceil(low / unit) * unit; v <= high + unit * 1e-9; v += unit) out.push(Number(v.toPrecision(12)))
  return out
}

/** On a log axis, the powers of ten in [low, high] (exponents) when there are two or more. */
const logTicks = (low: number, high: number): Array<number> => {
  const decades: Array<number> = []
  for (let e = Math.ceil(low); e <= Math.floor(high); e++) decades.push(e)
  return decades.length >= 2 ? decades : ticks(low, high)
}

const label = (v: number) => (Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(1) : String(Number(v.toPrecision(4))))

export const svg = (chart: Chart): string => {
  // The legend's column is as wide as its longest name (about 7 px a character at 12 px).
  const legend = Math.max(160, 48 + 7 * Math.max(0, ...chart.series.map((s) => s.name.length)))
  const width = 480 + legend
  const height = 400
  const margin = { left: 64, right: legend, top: 36, bottom: 48 }
  const series = chart.series.map((s) => ({ ...s, points: chart.logY ? s.points.filter(([, y]) => y > 0) : s.points }))
  const all = series.flatMap((s) => s.points)
  const fx = (x: number) => (chart.logX ? Math.log10(x) : x)
  const fy = (y: number) => (chart.logY ? Math.log10(y) : y)
  const xs = all.map(([x]) => fx(x))
  const ys = all.map(([, y]) => fy(y))
  const [x0, x1] = xs.length ? [Math.min(...xs), Math.max(...xs)] : [0, 1]
  const [y0, y1] = ys.length ? [Math.min(...ys), Math.max(...ys)] : [0, 1]
  const px = (x: number) => margin.left + ((fx(x) - x0) / (x1 - x0 || 1)) * (width - margin.left - margin.right)
  const py = (y: number) => height - margin.bottom - ((fy(y) - y0) / (y1 - y0 || 1)) * (height - margin.top - margin.bottom)
  const parts: Array<string> = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" font-family="sans-serif" font-size="12">`,
    `<rect width="${width}" height="${height}" fill="white"/>`,
    `<text x="${width / 2 - margin.right / 2}" y="20" text-anchor="middle" font-size="14">${escape(chart.title)}</text>`
  ]
  const yTicks = chart.logY ? logTicks(y0, y1).map((t) => 10 ** t) : ticks(y0, y1)
  for (const t of yTicks) {
    parts.push(`<line x1="${margin.left}" x2="${width - margin.right}" y1="${py(t)}" y2="${py(t)}" stroke="#ddd"/>`)
    parts.push(`<text x="${margin.left - 6}" y="${py(t) + 4}" text-anchor="end">${label(t)}</text>`)
  }
  const xTicks = chart.logX ? logTicks(x0, x1).map((t) => 10 ** t) : ticks(x0, x1)
  for (const t of xTicks) parts.push(`<text x="${px(t)}" y="${height - margin.bottom + 16}" text-anchor="middle">${label(t)}</text>`)
  parts.push(
    `<line x1="${margin.left}" x2="${width - margin.right}" y1="${height - margin.bottom}" y2="${height - margin.bottom}" stroke="black"/>`,
    `<line x1="${margin.left}" x2="${margin.left}" y1="${margin.top}" y2="${height - margin.bottom}" stroke="black"/>`,
    `<text x="${(margin.left + width - margin.right) / 2}" y="${height - 10}" text-anchor="middle">${escape(chart.x)}${chart.logX ? " (log)" : ""}</text>`,
    `<text transform="translate(16 ${(margin.top + height - margin.bottom) / 2}) rotate(-90)" text-anchor="middle">${escape(chart.y)}${chart.logY ? " (log)" : ""}</text>`
  )
  series.forEach((series, i) => {
    const color = palette[i % palette.length]
    const path = series.points.map(([x, y], j) => `${j === 0 ? "M" : "L"}${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(" ")
    parts.push(`<path d="${path}" fill="none" stroke="${color}" stroke-width="1.5"/>`)
    if (series.points.length <= 20) {
      for (const [x, y] of series.points) parts.push(`<circle cx="${px(x).toFixed(1)}" cy="${py(y).toFixed(1)}" r="3" fill="${color}"/>`)
    }
    const ly = margin.top + 16 * i
    parts.push(`<line x1="${width - margin.right + 12}" x2="${width - margin.right + 32}" y1="${ly}" y2="${ly}" stroke="${color}" stroke-width="2"/>`)
    parts.push(`<text x="${width - margin.right + 38}" y="${ly + 4}">${escape(series.name)}</text>`)
  })
  parts.push("</svg>")
  return parts.join("\n") + "\n"
}

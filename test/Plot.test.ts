import { assert, describe, it } from "@effect/vitest"
import * as Plot from "../src/report/Plot.ts"

/** The points of each drawn line, in pixels. */
const lines = (svg: string) =>
  [...svg.matchAll(/<path d="([^"]*)"/g)].map((m) => [...m[1].matchAll(/[ML](-?[\d.]+),(-?[\d.]+)/g)].map((p) => [Number(p[1]), Number(p[2])] as const))
const size = (svg: string) => {
  const [, width, height] = /width="(\d+)" height="(\d+)"/.exec(svg)!
  return { width: Number(width), height: Number(height) }
}

describe("Plot.svg", () => {
  it("draws every point inside the chart, with room in the legend for the longest name", () => {
    const name = "reasoning/2-grpo-verifiers-with-a-long-name"
    const svg = Plot.svg({
      title: "t",
      x: "step",
      y: "reward",
      series: [{ name, points: [[1, 0.1], [2, 0.5], [3, -0.2]] }, { name: "b", points: [[1, 2], [5, 1]] }]
    })
    const { width, height } = size(svg)
    for (const [x, y] of lines(svg).flat()) {
      assert.isTrue(x >= 0 && x <= width && y >= 0 && y <= height)
    }
    const [, legendX] = new RegExp(`<text x="([\\d.]+)" y="[\\d.]+">${name}</text>`).exec(svg)!
    assert.isAtMost(Number(legendX) + 7 * name.length, width)
  })

  it("on a log y axis puts each tenfold the same height apart and leaves out values that are not positive", () => {
    const svg = Plot.svg({ title: "t", x: "step", y: "loss", logY: true, series: [{ name: "loss", points: [[1, 100], [2, 10], [3, 0], [4, 1]] }] })
    const [points] = lines(svg)
    assert.strictEqual(points.length, 3)
    const [a, b, c] = points.map(([, y]) => y)
    assert.closeTo(b - a, c - b, 0.2)
    assert.include(svg, "loss (log)")
    // Ticks at the powers of ten.
    for (const tick of ["1", "10", "100"]) assert.match(svg, new RegExp(`text-anchor="end">${tick}</text>`))
  })
})

/**
 * A one-line progress bar on stderr, drawn only when stderr is a terminal (logs and pipes stay clean).
 */
export interface Progress {
  readonly update: (done: number, detail?: string) => void
  readonly finish: () => void
}

export const bar = (label: string, total: number | undefined): Progress => {
  const tty = process.stderr.isTTY === true
  const started = Date.now()
  let last = 0
  const draw = (done: number, detail = "") => {
    const width = 30
    const fraction = total ? Math.min(1, done / total) : 0
    const filled = Math.round(fraction * width)
    const bar = total ? `[${"#".repeat(filled)}${"-".repeat(width - filled)}] ${done}/${total}` : `${done}`
    const seconds = ((Date.now() - started) / 1000).toFixed(0)
    process.stderr.write(`\r${label} ${bar} ${detail} ${seconds}s\x1b[K`)
  }
  return {
    update: (done, detail) => {
      if (!tty || Date.now() - last < 100) return
      last = Date.now()
      draw(done, detail)
    },
    finish: () => {
      if (tty) process.stderr.write("\n")
    }
  }
}

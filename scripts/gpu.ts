/**
 * One entry for the GPU machine's bundle (../shared/gpu/prepare.sh scripts/gpu.ts), which has no
 * Node of its own: `bash .gpu/run.sh test|bench|cli|big|serve ARGS...` runs the GPU suite
 * (scripts/gpu-suite.ts), the benchmark (scripts/bench.ts), the `cascade` command line, the 1B
 * parent's stages (scripts/gpu-big.ts) or the serving benchmark (scripts/serve-bench.ts) with ARGS.
 */
const entries = {
  test: () => import("./gpu-suite.ts"),
  bench: () => import("./bench.ts"),
  cli: () => import("../src/cli/main.ts"),
  big: () => import("./gpu-big.ts"),
  serve: () => import("./serve-bench.ts")
}
const [what] = process.argv.splice(2, 1)
if (!(what in entries)) {
  console.error(`usage: gpu.ts ${Object.keys(entries).join("|")} ARGS...`)
  process.exit(2)
}
await entries[what as keyof typeof entries]()

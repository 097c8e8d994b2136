/**
 * One entry for the GPU machine's bundle (../shared/gpu/prepare.sh scripts/gpu.ts), which has no
 * Node of its own: `bash .gpu/run.sh test|bench|cli ARGS...` runs the GPU suite
 * (scripts/gpu-suite.ts), the benchmark (scripts/bench.ts) or the `cascade` command line with ARGS.
 */
const entries = {
  test: () => import("./gpu-suite.ts"),
  bench: () => import("./bench.ts"),
  cli: () => import("../src/cli/main.ts")
}
const [what] = process.argv.splice(2, 1)
if (!(what in entries)) {
  console.error(`usage: gpu.ts ${Object.keys(entries).join("|")} ARGS...`)
  process.exit(2)
}
await entries[what as keyof typeof entries]()

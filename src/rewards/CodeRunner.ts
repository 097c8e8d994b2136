/**
 * Runs a response's JavaScript against tests, isolated from this process: in a worker thread with
 * a capped heap, watched for buffer memory and time, and inside it in a `node:vm` context that has
 * the language's own globals and nothing of Node (no require, process, fs, timers). Whatever the
 * code does (loops forever, allocates without end, does not parse, throws) is a failed test with a
 * note, never a failure of the caller.
 *
 * Tests are JavaScript that `test(name, fn)` registers, with `assert(condition, message?)`,
 * `assert.equal(actual, expected)` (SameValueZero) and `assert.deepEqual(actual, expected)`
 * (arrays and plain objects by contents, anything else as `equal`) to hand; a test fails when it
 * throws, returns false or returns a promise (tests are synchronous). Tests that register nothing
 * are one test, "tests", that fails if they throw; tests that throw outside `test` add that failed
 * test. They run in strict mode, after the response's code, in the same global scope, so they see
 * its function by name.
 *
 * The response's code runs first and may be hostile, trying for reward by changing what the tests
 * rely on: the harness takes the built-ins it uses before that code runs, keeps its registry out of
 * reach, and accepts tests only from the tests' own script (it holds a token the code never sees).
 * Tests that use `assert` rather than built-ins the code can replace cannot be fooled that way.
 * vm is not a security boundary against a determined escape; the worker's limits and the absence
 * of Node's APIs in the context are what keep ordinary generated code harmless.
 */
import { randomUUID } from "node:crypto"
import { Worker } from "node:worker_threads"
import { Effect } from "effect"
import { RewardError } from "./Reward.ts"

export interface Limits {
  /** Per script: the response's code, the tests' registration, each test (default 2000). */
  readonly timeoutMs: number
  /** The worker's heap, and separately the buffers (ArrayBuffer) it holds, in MB (default 64). */
  readonly memoryMb: number
}

export const defaultLimits: Limits = { timeoutMs: 2000, memoryMb: 64 }

export interface TestResult {
  readonly name: string
  readonly passed: boolean
  readonly note?: string
}

/** What the worker reports: `broken` or `load` and no more, or `tests`, one `result` per test, and `done`. */
type Message =
  | { readonly kind: "load"; readonly note: string }
  | { readonly kind: "broken"; readonly note: string }
  | { readonly kind: "tests"; readonly names: ReadonlyArray<string> }
  | { readonly kind: "result"; readonly index: number; readonly note: string | undefined }
  | { readonly kind: "done" }

/**
 * Code run in the vm context before the response's, as `(name, token) => ...`: defines the harness
 * as a global that the response's code can neither replace nor shadow, and a silent console.
 */
const PRELUDE = String.raw`"use strict";
(name, token) => {
  // Taken before the response's code can replace them.
  const { create, defineProperty, freeze, getPrototypeOf, hasOwn, keys } = Object
  const { isArray } = Array
  const ObjectPrototype = Object.prototype
  const Fail = Error
  const toString = String
  const sameValueZero = (a, b) => a === b || (a !== a && b !== b)
  const deepEqual = (a, b) => {
    if (sameValueZero(a, b)) return true
    if (typeof a !== "object" || typeof b !== "object" || a === null || b === null) return false
    const prototype = getPrototypeOf(a)
    if (prototype !== getPrototypeOf(b) || !(isArray(a) || prototype === ObjectPrototype || prototype === null)) return false
    const [aKeys, bKeys] = [keys(a), keys(b)]
    if (aKeys.length !== bKeys.length) return false
    for (let i = 0; i < aKeys.length; i++) {
      if (!hasOwn(b, aKeys[i]) || !deepEqual(a[aKeys[i]], b[aKeys[i]])) return false
    }
    return true
  }
  const stringify = JSON.stringify
  const show = (value) => {
    try {
      const json = stringify(value)
      return json === undefined ? toString(value) : json
    } catch {
      return "a value that cannot be shown"
    }
  }
  const assert = (condition, message) => {
    if (!condition) throw new Fail(message ?? "assertion failed")
  }
  assert.equal = (actual, expected, message) => {
    if (!sameValueZero(actual, expected)) throw new Fail(message ?? "expected " + show(expected) + ", got " + show(actual))
  }
  assert.deepEqual = (actual, expected, message) => {
    if (!deepEqual(actual, expected)) throw new Fail(message ?? "expected " + show(expected) + ", got " + show(actual))
  }
  freeze(assert)

  const tests = create(null) // no prototype whose setters the response's code could have changed
  let count = 0
  let registering = false
  const test = (name, fn) => {
    if (!registering) throw new Fail("tests are registered only while the tests' script runs")
    if (typeof fn !== "function") throw new Fail("test " + show(name) + " is not a function")
    tests[count++] = { name: toString(name), fn }
  }
  defineProperty(globalThis, name, {
    value: freeze({
      define(key, register) {
        if (key !== token || count > 0) throw new Fail("only the tests register tests")
        registering = true
        try {
          register(test, assert)
        } finally {
          registering = false
        }
      },
      count: () => count,
      name: (i) => tests[i].name,
      run(i) {
        const outcome = tests[i].fn()
        if (outcome === false) throw new Fail("returned false")
        if ((typeof outcome === "object" || typeof outcome === "function") && outcome !== null && typeof outcome.then === "function") {
          throw new Fail("returned a promise: tests run synchronously")
        }
      }
    })
  })
  const silent = () => {}
  globalThis.console = { log: silent, info: silent, warn: silent, error: silent, debug: silent }
}`

/**
 * The worker, as CommonJS run with `eval: true`: plain JavaScript in a string, so that it starts the
 * same under Node's type stripping, vitest's transforms or a bundle, with no file of its own to find.
 */
const WORKER = String.raw`"use strict"
const { parentPort, workerData } = require("node:worker_threads")
const vm = require("node:vm")
const { prelude, code, entry, tests, timeoutMs, name, token } = workerData
const post = (message) => parentPort.postMessage(message)
const context = vm.createContext(vm.constants.DONT_CONTEXTIFY, {
  codeGeneration: { strings: false, wasm: false },
  microtaskMode: "afterEvaluate" // promise jobs run inside the time limit too
})
const run = (source, filename) => new vm.Script(source, { filename }).runInContext(context, { timeout: timeoutMs })
// The thrown value may be the response's, whose getters run here: the host's watchdog bounds them.
const describe = (error) => {
  try {
    const text = typeof error === "object" && error !== null && "message" in error ? error.name + ": " + error.message : String(error)
    return text.length > 500 ? text.slice(0, 500) + "..." : text
  } catch {
    return "threw a value that cannot be described"
  }
}

const main = () => {
  run(prelude, "harness.js")(name, token)
  let registration
  try {
    registration = new vm.Script(name + ".define(" + JSON.stringify(token) + ", function (test, assert) {\"use strict\";\n" + tests + "\n})", { filename: "tests.js" })
  } catch (error) {
    return post({ kind: "broken", note: describe(error) })
  }
  try {
    // ES module syntax is common in answers and means nothing here.
    run(code.replace(/^(\s*)export\s+(?:default\s+)?/gm, "$1"), "response.js")
    if (run("typeof " + entry, "entry.js") !== "function") throw new Error("the response defines no function " + entry)
  } catch (error) {
    return post({ kind: "load", note: describe(error) })
  }
  let failure
  try {
    registration.runInContext(context, { timeout: timeoutMs })
  } catch (error) {
    failure = describe(error)
  }
  const count = run(name + ".count()", "count.js")
  const names = Array.from({ length: count }, (_, i) => run(name + ".name(" + i + ")", "name.js"))
  if (count === 0 || failure !== undefined) names.push("tests")
  post({ kind: "tests", names })
  for (let i = 0; i < count; i++) {
    let note
    try {
      run(name + ".run(" + i + ")", "test.js")
    } catch (error) {
      note = describe(error)
    }
    post({ kind: "result", index: i, note })
  }
  if (names.length > count) post({ kind: "result", index: count, note: failure })
  post({ kind: "done" })
}
main()
`

/** Past each script's own limit, for the worker to start and report, before the host stops it. */
const GRACE_MS = 2000
/** Less, and a worker may not even start: below a few MB, V8 aborts the whole process while it sets up the heap. */
const MIN_MEMORY_MB = 16
/** How often the worker's buffer memory is looked at. */
const MEMORY_POLL_MS = 25

/**
 * Runs `code` (defining function `entry`) and then `tests` in a fresh worker; one result per test.
 * Fails only for faults of the task or the host: an entry that is no name, limits too small, tests
 * that do not parse, a worker that cannot be started.
 */
export const run = (code: string, entry: string, tests: string, limits: Limits = defaultLimits): Effect.Effect<ReadonlyArray<TestResult>, RewardError> =>
  Effect.callback<ReadonlyArray<TestResult>, RewardError>((resume) => {
    const { timeoutMs, memoryMb } = limits
    const invalid = !/^[A-Za-z_$][\w$]*$/.test(entry)
      ? `the entry ${JSON.stringify(entry)} is not a JavaScript identifier`
      : !(timeoutMs > 0 && Number.isInteger(memoryMb) && memoryMb >= MIN_MEMORY_MB)
      ? `the limits must be a positive time and at least ${MIN_MEMORY_MB} MB, not ${timeoutMs} ms and ${memoryMb} MB`
      : undefined
    if (invalid !== undefined) return resume(Effect.fail(new RewardError({ source: "code", reason: invalid })))
    let worker: Worker
    try {
      worker = new Worker(WORKER, {
        eval: true,
        workerData: { prelude: PRELUDE, code, entry, tests, timeoutMs, name: `__cascade_${randomUUID().replaceAll("-", "")}`, token: randomUUID() },
        resourceLimits: { maxOldGenerationSizeMb: memoryMb, maxYoungGenerationSizeMb: Math.min(16, Math.floor(memoryMb / 4)) },
        env: {},
        stdout: true, // not piped to this process's
        stderr: true
      })
    } catch (error) {
      return resume(Effect.fail(new RewardError({ source: "code", reason: `cannot start a worker: ${String(error)}` })))
    }

    let finished = false
    let names: ReadonlyArray<string> | undefined
    const notes = new Map<number, string | undefined>()
    let watchdog: ReturnType<typeof setTimeout> | undefined
    const memory = setInterval(() => {
      worker.getHeapStatistics().then(
        (statistics) => {
          if (statistics.external_memory > memoryMb * 2 ** 20) finish(`exceeded ${memoryMb} MB of buffer memory`)
        },
        () => {} // the worker has just stopped
      )
    }, MEMORY_POLL_MS)
    const stop = () => {
      finished = true
      clearInterval(memory)
      clearTimeout(watchdog)
      worker.removeAllListeners()
      worker.on("error", () => {}) // one raised while it stops would otherwise be thrown here
      void worker.terminate()
    }
    const settle = (outcome: Effect.Effect<ReadonlyArray<TestResult>, RewardError>) => {
      if (finished) return
      stop()
      resume(outcome)
    }
    /** The results: the test that was running (if any) fails with `reason`, the rest were not run. */
    const finish = (reason?: string) => {
      if (names === undefined) return settle(Effect.succeed([{ name: "load", passed: false, note: reason ?? "the worker stopped" }]))
      const running = names.findIndex((_, i) => !notes.has(i))
      settle(Effect.succeed(names.map((name, i) => {
        if (notes.has(i)) {
          const note = notes.get(i)
          return note === undefined ? { name, passed: true } : { name, passed: false, note }
        }
        return { name, passed: false, note: i === running ? reason : "not run: the worker was stopped" }
      })))
    }
    const watch = () => {
      clearTimeout(watchdog)
      watchdog = setTimeout(() => finish(`no progress within ${timeoutMs + GRACE_MS} ms`), timeoutMs + GRACE_MS)
    }
    watch()

    worker.on("message", (message: Message) => {
      watch()
      switch (message.kind) {
        case "broken":
          return settle(Effect.fail(new RewardError({ source: "code", reason: `the tests do not parse: ${message.note}` })))
        case "load":
          return finish(message.note)
        case "tests":
          names = message.names
          return
        case "result":
          notes.set(message.index, message.note)
          return
        case "done":
          return finish()
      }
    })
    worker.on("error", (error: Error & { code?: string }) =>
      finish(error.code === "ERR_WORKER_OUT_OF_MEMORY" ? `exceeded its ${memoryMb} MB heap` : `the worker failed: ${error.message}`)
    )
    worker.on("exit", (code) => finish(`the worker exited (code ${code})`))
    return Effect.sync(stop)
  })

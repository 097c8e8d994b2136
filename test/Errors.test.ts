import { describe, expect, it } from "@effect/vitest"
import { CheckpointError } from "../src/Errors.ts"

describe("Errors", () => {
  it("names the file and tensor in the message", () => {
    const error = new CheckpointError({ file: "a.safetensors", tensor: "lm_head.weight", reason: "missing" })
    expect(error.message).toBe("a.safetensors (tensor lm_head.weight): missing")
    expect(error._tag).toBe("CheckpointError")
  })
})

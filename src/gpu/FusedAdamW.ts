/**
 * AdamW's update of one parameter as one GPU dispatch: parameter, gradient and both moments read
 * once, the three results written once, where tfjs' ops take thirteen dispatches and as many
 * intermediate tensors. The arithmetic is Optimizer.update's, in the same order (torch's AdamW).
 */
import type * as tf from "@tensorflow/tfjs"
import { bufferOf, dispatch, linearGroups, linearIndex, output, tensorOf, webGpuBackend } from "./Dispatch.ts"

/** Whether updates can run fused: the backend is webgpu. */
export const available = (): boolean => webGpuBackend() !== undefined

export interface Moments {
  readonly beta1: number
  readonly beta2: number
  readonly eps: number
}

/**
 * `scalars` holds [lr / (1 - beta1^t), sqrt(1 - beta2^t), 1 - lr * weightDecay, 1, apply]: the step
 * size, the second bias correction, the decay factor of decayed parameters and of the others, and
 * whether to update at all (0: everything stays as it was).
 */
const shader = (size: number, decayed: boolean, { beta1, beta2, eps }: Moments) => `
@group(0) @binding(0) var<storage, read> param: array<f32>;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read> expAvg: array<f32>;
@group(0) @binding(3) var<storage, read> expAvgSq: array<f32>;
@group(0) @binding(4) var<storage, read> scalars: array<f32>;
@group(0) @binding(5) var<storage, read_write> newParam: array<f32>;
@group(0) @binding(6) var<storage, read_write> newExpAvg: array<f32>;
@group(0) @binding(7) var<storage, read_write> newExpAvgSq: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) id: vec3u, @builtin(num_workgroups) groups: vec3u) {
  let i = ${linearIndex};
  if (i >= ${size}u) { return; }
  if (scalars[4] == 0.0) {
    newParam[i] = param[i];
    newExpAvg[i] = expAvg[i];
    newExpAvgSq[i] = expAvgSq[i];
    return;
  }
  let g = grad[i];
  let m = expAvg[i] + (g - expAvg[i]) * ${1 - beta1};
  let v = expAvgSq[i] * ${beta2} + g * g * ${1 - beta2};
  let denominator = sqrt(v) / scalars[1] + ${eps};
  newParam[i] = param[i] * scalars[${decayed ? 2 : 3}] - (m / denominator) * scalars[0];
  newExpAvg[i] = m;
  newExpAvgSq[i] = v;
}`

/** Updates `param` and its moments in one dispatch; `scalars` as the shader says. */
export const update = (param: tf.Variable, grad: tf.Tensor, expAvg: tf.Variable, expAvgSq: tf.Variable, scalars: tf.Tensor1D, decayed: boolean, moments: Moments): void => {
  const backend = webGpuBackend()!
  const results = [output(backend, param.shape), output(backend, param.shape), output(backend, param.shape)]
  const inputs = [param, grad, expAvg, expAvgSq, scalars].map((tensor) => bufferOf(backend, tensor))
  const kernel = { key: `adamw ${param.size} ${decayed} ${moments.beta1} ${moments.beta2} ${moments.eps}`, code: () => shader(param.size, decayed, moments) }
  dispatch(backend, kernel, [...inputs, ...results.map((result) => result.buffer)], linearGroups(param.size))
  const [newParam, newExpAvg, newExpAvgSq] = results.map((result) => tensorOf(result.info))
  param.assign(newParam)
  expAvg.assign(newExpAvg)
  expAvgSq.assign(newExpAvgSq)
  newParam.dispose()
  newExpAvg.dispose()
  newExpAvgSq.dispose()
}

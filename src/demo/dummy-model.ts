/**
 * The one model the stand-in serves: `dummy`, the same toy model OVMS uses in
 * its own tests. Input `b` FP32 [1,10], output `a` = b + 1, FP32 [1,10].
 * Protocol-neutral: the gRPC and REST front ends both call into this file,
 * so the two cannot disagree on validation or results.
 */

export const MODEL_NAME = 'dummy';
export const MODEL_VERSION = '1';
export const INPUT_NAME = 'b';
export const OUTPUT_NAME = 'a';
export const DATATYPE = 'FP32';
export const SHAPE: readonly number[] = [1, 10];
export const ELEMENTS = 10;

/** OVMS's wording, so clients that match on messages see the familiar text. */
export const NOT_FOUND_NAME = 'Model with requested name is not found';
export const NOT_FOUND_VERSION = 'Model with requested version is not found';

export const SERVER_NAME = 'OpenVINO Model Server';
export const SERVER_VERSION = 'ovms-mtls stand-in';

/** Why a request cannot be served; each front end maps it to its own status. */
export class ModelError extends Error {
  constructor(
    readonly kind: 'not_found' | 'invalid',
    message: string,
  ) {
    super(message);
  }
}

export function tensorMetadata() {
  return {
    name: MODEL_NAME,
    versions: [MODEL_VERSION],
    platform: 'OpenVINO',
    inputs: [{ name: INPUT_NAME, datatype: DATATYPE, shape: [...SHAPE] }],
    outputs: [{ name: OUTPUT_NAME, datatype: DATATYPE, shape: [...SHAPE] }],
  };
}

export function serverMetadata() {
  return { name: SERVER_NAME, version: SERVER_VERSION, extensions: [] as string[] };
}

/** Throws ModelError unless name/version address the dummy model. An empty version means "latest". */
export function checkModel(name: string, version?: string): void {
  if (name !== MODEL_NAME) throw new ModelError('not_found', NOT_FOUND_NAME);
  if (version !== undefined && version !== '' && version !== MODEL_VERSION) {
    throw new ModelError('not_found', NOT_FOUND_VERSION);
  }
}

/** Validates the declared input tensor (name, datatype, shape) before any data is read. */
export function checkInput(name: string, datatype: string, shape: readonly (string | number)[]): void {
  if (name !== INPUT_NAME) throw new ModelError('invalid', `Invalid input name: ${name}`);
  if (datatype !== DATATYPE) throw new ModelError('invalid', `Invalid input precision: ${datatype}`);
  const dims = shape.map(Number);
  if (dims.length !== SHAPE.length || dims.some((d, i) => d !== SHAPE[i])) {
    throw new ModelError('invalid', `Invalid input shape: [${dims.join(',')}], expected [${SHAPE.join(',')}]`);
  }
}

/** Decodes raw tensor bytes the way KServe defines them: little-endian, row-major. */
export function fromRaw(raw: Uint8Array): Float32Array {
  if (raw.byteLength !== ELEMENTS * 4) {
    throw new ModelError('invalid', `Invalid content size of tensor proto - expected ${ELEMENTS * 4} bytes, got ${raw.byteLength}`);
  }
  const view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
  const out = new Float32Array(ELEMENTS);
  for (let i = 0; i < ELEMENTS; i++) out[i] = view.getFloat32(i * 4, true);
  return out;
}

export function toRaw(values: Float32Array): Buffer {
  const buf = Buffer.alloc(values.length * 4);
  values.forEach((v, i) => buf.writeFloatLE(v, i * 4));
  return buf;
}

export function fromNumbers(values: readonly unknown[]): Float32Array {
  if (values.length !== ELEMENTS || values.some((v) => typeof v !== 'number')) {
    throw new ModelError('invalid', `Invalid input data: expected ${ELEMENTS} numbers, got ${values.length} values`);
  }
  return Float32Array.from(values as number[]);
}

/** The model itself. Float32Array keeps the arithmetic in FP32, like the real model. */
export function runDummy(input: Float32Array): Float32Array {
  return input.map((v) => v + 1);
}

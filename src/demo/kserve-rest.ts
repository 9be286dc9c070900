/**
 * KServe v2 REST inference for the dummy model: JSON bodies, and the binary
 * extension (`Inference-Header-Content-Length`: a JSON header followed by
 * raw little-endian tensor bytes) that OVMS also accepts.
 */
import {
  ModelError, checkInput, checkModel, fromNumbers, fromRaw, runDummy,
  DATATYPE, MODEL_NAME, MODEL_VERSION, OUTPUT_NAME, SHAPE,
} from './dummy-model.js';
import { HttpError, asRecord, parseJson } from './http-util.js';

interface RestInput {
  name: string;
  datatype: string;
  shape: number[];
  data?: unknown;
  binarySize?: number;
}

function parseInput(value: unknown): RestInput {
  const obj = asRecord(value, 'Input');
  const params = typeof obj.parameters === 'object' && obj.parameters !== null
    ? (obj.parameters as Record<string, unknown>)
    : {};
  if (typeof obj.name !== 'string' || typeof obj.datatype !== 'string' || !Array.isArray(obj.shape)) {
    throw new HttpError(400, 'Each input needs name, datatype and shape');
  }
  return {
    name: obj.name,
    datatype: obj.datatype,
    shape: obj.shape.map(Number),
    data: obj.data,
    binarySize: typeof params.binary_data_size === 'number' ? params.binary_data_size : undefined,
  };
}

/** Splits a binary-extension body into its JSON header and the raw bytes after it. */
function splitBody(body: Buffer, headerLength: string | undefined): { header: unknown; binary: Buffer } {
  if (headerLength === undefined) return { header: parseJson(body), binary: Buffer.alloc(0) };
  const n = Number(headerLength);
  if (!Number.isInteger(n) || n < 0 || n > body.length) {
    throw new HttpError(400, 'Invalid Inference-Header-Content-Length');
  }
  return { header: parseJson(body.subarray(0, n)), binary: body.subarray(n) };
}

function inputValues(input: RestInput, binary: Buffer): Float32Array {
  if (input.binarySize !== undefined) {
    if (input.binarySize > binary.length) throw new HttpError(400, 'binary_data_size exceeds the body');
    return fromRaw(binary.subarray(0, input.binarySize));
  }
  if (!Array.isArray(input.data)) throw new HttpError(400, 'Input data missing');
  // KServe allows nested row-major arrays as well as a flat list.
  return fromNumbers(input.data.flat(Infinity));
}

/** Maps model-level refusals to the statuses OVMS uses on REST. */
function restError(err: unknown): never {
  if (err instanceof ModelError) throw new HttpError(err.kind === 'not_found' ? 404 : 400, err.message);
  throw err;
}

/** Answers POST /v2/models/{model}[/versions/{version}]/infer. */
export function inferRest(model: string, version: string | undefined, body: Buffer, headerLength?: string): unknown {
  try {
    checkModel(model, version);
    const { header, binary } = splitBody(body, headerLength);
    const request = asRecord(header, 'Inference request');
    const inputs = Array.isArray(request.inputs) ? request.inputs.map(parseInput) : [];
    if (inputs.length !== 1) throw new ModelError('invalid', `Invalid number of inputs - expected: 1; actual: ${inputs.length}`);
    checkInput(inputs[0].name, inputs[0].datatype, inputs[0].shape);
    const output = runDummy(inputValues(inputs[0], binary));
    return {
      model_name: MODEL_NAME,
      model_version: MODEL_VERSION,
      ...(typeof request.id === 'string' ? { id: request.id } : {}),
      outputs: [{ name: OUTPUT_NAME, shape: [...SHAPE], datatype: DATATYPE, data: Array.from(output) }],
    };
  } catch (err) {
    return restError(err);
  }
}

/** Throws the REST form of "unknown model/version", or returns quietly. */
export function requireModel(model: string, version: string | undefined): void {
  try {
    checkModel(model, version);
  } catch (err) {
    restError(err);
  }
}

/** The shape of OVMS's GET /v1/config answer for one loaded version. */
export function configStatus(): unknown {
  return {
    [MODEL_NAME]: {
      model_version_status: [
        { version: MODEL_VERSION, state: 'AVAILABLE', status: { error_code: 'OK', error_message: 'OK' } },
      ],
    },
  };
}

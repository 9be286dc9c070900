/**
 * gRPC handlers for inference.GRPCInferenceService, backed by the dummy model.
 * Mirrors OVMS's observable behaviour: NOT_FOUND for unknown models or
 * versions, INVALID_ARGUMENT for bad tensors, raw output when the request
 * used raw input, and per-message errors (not call failure) on the stream.
 */
import * as grpc from '@grpc/grpc-js';
import {
  ModelError, checkInput, checkModel, fromNumbers, fromRaw, runDummy, serverMetadata, tensorMetadata, toRaw,
  DATATYPE, MODEL_NAME, MODEL_VERSION, OUTPUT_NAME, SHAPE,
} from './dummy-model.js';
import type {
  Empty, ModelInferRequest, ModelInferResponse, ModelMetadataResponse, ModelRef, ModelStreamInferResponse,
  ServerMetadataResponse,
} from './protocol.js';

/** Called with the method path when the client cancels a call we were still serving. */
export type CancelRecorder = (path: string) => void;

/** Computes the ModelInfer answer or throws ModelError. */
export function inferGrpc(request: ModelInferRequest): ModelInferResponse {
  checkModel(request.model_name, request.model_version);
  if (request.inputs.length !== 1) {
    throw new ModelError('invalid', `Invalid number of inputs - expected: 1; actual: ${request.inputs.length}`);
  }
  const [tensor] = request.inputs;
  checkInput(tensor.name, tensor.datatype, tensor.shape);
  const raw = request.raw_input_contents ?? [];
  // OVMS answers in the same form the client used: raw in, raw out.
  const useRaw = raw.length > 0;
  const input = useRaw ? fromRaw(raw[0]) : fromNumbers(tensor.contents?.fp32_contents ?? []);
  const output = runDummy(input);
  return {
    model_name: MODEL_NAME,
    model_version: MODEL_VERSION,
    id: request.id ?? '',
    parameters: {},
    outputs: [{
      name: OUTPUT_NAME,
      datatype: DATATYPE,
      shape: [...SHAPE],
      ...(useRaw ? {} : { contents: { fp32_contents: Array.from(output) } }),
    }],
    raw_output_contents: useRaw ? [toRaw(output)] : [],
  };
}

function toServiceError(err: unknown): Partial<grpc.StatusObject> {
  if (err instanceof ModelError) {
    const code = err.kind === 'not_found' ? grpc.status.NOT_FOUND : grpc.status.INVALID_ARGUMENT;
    return { code, details: err.message };
  }
  return { code: grpc.status.INTERNAL, details: String(err) };
}

/** Runs a synchronous unary body, turning thrown ModelErrors into gRPC statuses. */
function unaryHandler<Req, Res>(body: (req: Req) => Res): grpc.handleUnaryCall<Req, Res> {
  return (call, callback) => {
    let response: Res;
    try {
      response = body(call.request);
    } catch (err) {
      callback(toServiceError(err));
      return;
    }
    callback(null, response);
  };
}

function modelReady(req: ModelRef): { ready: boolean } {
  checkModel(req.name, req.version);
  return { ready: true };
}

function modelMetadata(req: ModelRef): ModelMetadataResponse {
  checkModel(req.name, req.version);
  return tensorMetadata();
}

/** One response per request; model errors travel in error_message and the stream goes on. */
function streamInfer(onCancel: CancelRecorder): grpc.handleBidiStreamingCall<ModelInferRequest, ModelStreamInferResponse> {
  return (call) => {
    call.on('cancelled', () => onCancel(call.getPath()));
    call.on('data', (request: ModelInferRequest) => {
      let reply: ModelStreamInferResponse;
      try {
        reply = { error_message: '', infer_response: inferGrpc(request) };
      } catch (err) {
        reply = { error_message: err instanceof Error ? err.message : String(err), infer_response: null };
      }
      call.write(reply);
    });
    call.on('end', () => call.end());
  };
}

export function kserveHandlers(onCancel: CancelRecorder): grpc.UntypedServiceImplementation {
  return {
    ServerLive: unaryHandler<Empty, { live: boolean }>(() => ({ live: true })),
    ServerReady: unaryHandler<Empty, { ready: boolean }>(() => ({ ready: true })),
    ModelReady: unaryHandler(modelReady),
    ServerMetadata: unaryHandler<Empty, ServerMetadataResponse>(serverMetadata),
    ModelMetadata: unaryHandler(modelMetadata),
    ModelInfer: unaryHandler(inferGrpc),
    ModelStreamInfer: streamInfer(onCancel),
  };
}

/**
 * Client helpers for the KServe and Echo services, for tests and for the
 * demo/probe commands. The clients are grpc-js generic clients with typed
 * method signatures laid over them (one 4-argument form per unary method, so
 * the `unary()` helper can infer request and response types).
 */
import * as grpc from '@grpc/grpc-js';
import {
  ECHO_SERVICE, KSERVE_SERVICE, serviceConstructor,
  type EchoReply, type EchoRequest, type Empty, type ModelInferRequest, type ModelInferResponse,
  type ModelMetadataResponse, type ModelRef, type ModelStreamInferResponse, type ServerMetadataResponse,
} from './protocol.js';

export { protoDir, loadProtos } from './protocol.js';
export type * from './protocol.js';

type UnaryMethod<Req, Res> = (
  request: Req,
  metadata: grpc.Metadata,
  options: grpc.CallOptions,
  callback: grpc.requestCallback<Res>,
) => grpc.ClientUnaryCall;

export interface KserveClient extends grpc.Client {
  ServerLive: UnaryMethod<Empty, { live: boolean }>;
  ServerReady: UnaryMethod<Empty, { ready: boolean }>;
  ModelReady: UnaryMethod<ModelRef, { ready: boolean }>;
  ServerMetadata: UnaryMethod<Empty, ServerMetadataResponse>;
  ModelMetadata: UnaryMethod<ModelRef, ModelMetadataResponse>;
  ModelInfer: UnaryMethod<ModelInferRequest, ModelInferResponse>;
  ModelStreamInfer(
    metadata?: grpc.Metadata,
    options?: grpc.CallOptions,
  ): grpc.ClientDuplexStream<ModelInferRequest, ModelStreamInferResponse>;
}

export interface EchoClient extends grpc.Client {
  Unary: UnaryMethod<EchoRequest, EchoReply>;
  Hold: UnaryMethod<EchoRequest, EchoReply>;
  ClientStream(
    metadata: grpc.Metadata,
    options: grpc.CallOptions,
    callback: grpc.requestCallback<EchoReply>,
  ): grpc.ClientWritableStream<EchoRequest>;
  ServerStream(request: EchoRequest, metadata?: grpc.Metadata, options?: grpc.CallOptions): grpc.ClientReadableStream<EchoReply>;
  Bidi(metadata?: grpc.Metadata, options?: grpc.CallOptions): grpc.ClientDuplexStream<EchoRequest, EchoReply>;
}

/**
 * OVMS answers up to 1 GiB; grpc-js clients refuse anything over 4 MiB by
 * default, which a single ResNet batch already exceeds.
 */
export const DEFAULT_CHANNEL_OPTIONS: grpc.ChannelOptions = {
  'grpc.max_receive_message_length': 1024 * 1024 * 1024,
  'grpc.max_send_message_length': 1024 * 1024 * 1024,
};

function makeClient<C>(service: string, address: string, credentials: grpc.ChannelCredentials, options?: grpc.ChannelOptions): C {
  const Ctor = serviceConstructor(service);
  return new Ctor(address, credentials, { ...DEFAULT_CHANNEL_OPTIONS, ...options }) as unknown as C;
}

export function kserveClient(address: string, credentials: grpc.ChannelCredentials, options?: grpc.ChannelOptions): KserveClient {
  return makeClient<KserveClient>(KSERVE_SERVICE, address, credentials, options);
}

export function echoClient(address: string, credentials: grpc.ChannelCredentials, options?: grpc.ChannelOptions): EchoClient {
  return makeClient<EchoClient>(ECHO_SERVICE, address, credentials, options);
}

type RequestOf<F> = F extends UnaryMethod<infer Req, infer _Res> ? Req : never;
type ResponseOf<F> = F extends UnaryMethod<infer _Req, infer Res> ? Res : never;
/** Names of the unary methods of a client type. */
export type UnaryName<C> = { [K in keyof C]: C[K] extends UnaryMethod<infer _A, infer _B> ? K : never }[keyof C];

export interface UnaryResult<Res> {
  response: Res;
  /** Response header metadata. */
  metadata: grpc.Metadata;
  /** Final status; `status.metadata` holds the trailers. */
  status: grpc.StatusObject;
}

/**
 * Calls a unary method and resolves with response, headers and final status.
 * On a non-OK status it rejects with grpc-js's ServiceError, whose `code`,
 * `details` and `metadata` (the trailers) tests can inspect; the header
 * metadata received so far is attached as `headers`.
 */
export function unary<C extends grpc.Client, K extends UnaryName<C>>(
  client: C,
  method: K,
  request: RequestOf<C[K]>,
  metadata: grpc.Metadata = new grpc.Metadata(),
  options: grpc.CallOptions = {},
): Promise<UnaryResult<ResponseOf<C[K]>>> {
  type Res = ResponseOf<C[K]>;
  const fn = client[method] as unknown as UnaryMethod<RequestOf<C[K]>, Res>;
  return new Promise((resolve, reject) => {
    let headers = new grpc.Metadata();
    let outcome: { error: grpc.ServiceError | null; response?: Res } | undefined;
    const call = fn.call(client, request, metadata, options, (error, response) => {
      outcome = { error, response };
    });
    call.on('metadata', (md: grpc.Metadata) => {
      headers = md;
    });
    // grpc-js calls the callback first, then emits 'status': resolve on the latter so it is complete.
    call.on('status', (status: grpc.StatusObject) => {
      if (outcome?.error || status.code !== grpc.status.OK) {
        reject(Object.assign(outcome?.error ?? new Error(status.details), { headers }));
      } else {
        resolve({ response: outcome?.response as Res, metadata: headers, status });
      }
    });
  });
}

/**
 * What the orchestrator (run.ts) and its child processes (upstream.ts,
 * driver.ts) say to each other over the fork() IPC channel.
 */
import type { HistogramData } from './histogram.js';

export type ScenarioId =
  | 'grpc-unary-1k'
  | 'grpc-unary-2.9m'
  | 'grpc-bidi-1k'
  | 'rest-h1-1k'
  | 'rest-h2-1k'
  | 'sse'
  | 'handshake'
  | 'idle';

/** Paths on the bench upstream; the gRPC ones are the real KServe method names. */
export const PATHS = {
  grpcUnary: '/inference.GRPCInferenceService/ModelInfer',
  grpcBidi: '/inference.GRPCInferenceService/ModelStreamInfer',
  restInfer: '/v2/models/bench/infer',
  restReady: '/v2/health/ready',
  sse: '/v3/chat/completions',
} as const;

/** Request metadata asking the upstream for a reply of this many payload bytes (else: echo). */
export const REPLY_BYTES_HEADER = 'bench-reply-bytes';

export interface ClientTls {
  readonly ca: string;
  readonly cert: string;
  readonly key: string;
}

/** Where a driver connects: `tls` unset means plaintext straight to the upstream. */
export interface Endpoint {
  readonly host: string;
  readonly port: number;
  readonly tls?: ClientTls | undefined;
}

export interface DriverSpec {
  readonly scenario: ScenarioId;
  readonly endpoint: Endpoint;
  /** Connections (HTTP/2 sessions or HTTP/1.1 sockets) this driver opens. */
  readonly connections: number;
  /** Requests or streams in flight per connection (HTTP/2 only; HTTP/1.1 has one). */
  readonly streamsPerConnection: number;
  readonly payloadBytes: number;
  /** gRPC: reply payload size; -1 = echo the request. */
  readonly replyBytes: number;
  readonly warmupMs: number;
  readonly durationMs: number;
  /** Per phase cap on operations: every loop stops by itself. */
  readonly maxOps: number;
  /** Bidi: messages per stream; SSE: events per stream. */
  readonly messagesPerStream: number;
  /** SSE: milliseconds between events. */
  readonly intervalMs: number;
  /** Idle scenario: connections to open and hold. */
  readonly idleConnections: number;
}

export interface PhaseResult {
  ops: number;
  errors: number;
  elapsedMs: number;
  histogram: HistogramData;
  /** First few distinct error reasons with their counts. */
  errorSamples: Record<string, number>;
}

export type DriverMessage =
  | { type: 'ready'; warmup: PhaseResult }
  | { type: 'holding'; opened: number; failed: number; errorSamples: Record<string, number>; elapsedMs: number }
  | { type: 'done'; result: PhaseResult }
  | { type: 'failed'; message: string };

export type ParentMessage = { type: 'start'; spec: DriverSpec } | { type: 'go' } | { type: 'release' };

export interface UpstreamPorts {
  /** gRPC echo over h2c. */
  grpc: number;
  /** REST echo + SSE over HTTP/1.1. */
  rest: number;
  /** The same REST handlers over h2c, for the direct HTTP/2 row. */
  restH2c: number;
  /** mTLS (h2 and HTTP/1.1) without any forwarding: the direct row of the TLS scenarios. */
  tls: number;
}

export type UpstreamMessage = { type: 'listening'; ports: UpstreamPorts };

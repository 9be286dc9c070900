/**
 * The scenarios of issue #6 and how hard each one pushes. `quick` (the
 * default) keeps a whole run under ~10 minutes on 2 cores; `full` runs longer
 * and holds 10,000 idle connections.
 */
import type { DriverSpec, ScenarioId } from './protocol.js';

export type Profile = 'quick' | 'full';

export interface Scenario {
  readonly id: ScenarioId;
  readonly title: string;
  /** For the chart. */
  readonly short: string;
  /** What one operation is, for the throughput column. */
  readonly unit: string;
  /** Driver processes. */
  readonly drivers: number;
  /** Per driver, without the endpoint. */
  readonly spec: Omit<DriverSpec, 'endpoint' | 'warmupMs' | 'durationMs' | 'maxOps' | 'idleConnections'>;
}

/** face-detection-adas-0001: input 1x3x384x672 FP32 (2.95 MiB); output 1x1x200x7 FP32. */
export const FACE_DETECTION_INPUT = 3 * 384 * 672 * 4;
export const FACE_DETECTION_OUTPUT = 200 * 7 * 4;

const base = { payloadBytes: 1024, replyBytes: -1, messagesPerStream: 0, intervalMs: 0, streamsPerConnection: 1 };

export const SCENARIOS: readonly Scenario[] = [
  { id: 'grpc-unary-1k', short: 'gRPC unary 1 KiB', title: 'gRPC unary, 1 KiB each way', unit: 'calls/s', drivers: 2, spec: { ...base, scenario: 'grpc-unary-1k', connections: 2, streamsPerConnection: 16 } },
  {
    id: 'grpc-unary-2.9m', short: 'gRPC unary 2.9 MB', title: 'gRPC unary, 2.9 MB request (face-detection input), 5.5 KB reply', unit: 'calls/s', drivers: 2,
    spec: { ...base, scenario: 'grpc-unary-2.9m', connections: 1, streamsPerConnection: 4, payloadBytes: FACE_DETECTION_INPUT, replyBytes: FACE_DETECTION_OUTPUT },
  },
  { id: 'grpc-bidi-1k', short: 'gRPC bidi 1 KiB msgs', title: 'gRPC bidi stream, 1 KiB messages (ping-pong)', unit: 'msgs/s', drivers: 2, spec: { ...base, scenario: 'grpc-bidi-1k', connections: 2, streamsPerConnection: 8, messagesPerStream: 1000 } },
  { id: 'rest-h1-1k', short: 'REST 1 KiB, HTTP/1.1', title: 'REST KServe JSON infer, 1 KiB, HTTP/1.1', unit: 'req/s', drivers: 2, spec: { ...base, scenario: 'rest-h1-1k', connections: 16 } },
  { id: 'rest-h2-1k', short: 'REST 1 KiB, HTTP/2', title: 'REST KServe JSON infer, 1 KiB, HTTP/2', unit: 'req/s', drivers: 2, spec: { ...base, scenario: 'rest-h2-1k', connections: 2, streamsPerConnection: 16 } },
  { id: 'sse', short: 'SSE events', title: 'SSE: upstream write to client receipt (10 ms apart)', unit: 'events/s', drivers: 1, spec: { ...base, scenario: 'sse', connections: 8, messagesPerStream: 100, intervalMs: 10 } },
  { id: 'handshake', short: 'mTLS handshakes', title: 'New mTLS connection per request (EC P-256, TLS 1.3)', unit: 'handshakes/s', drivers: 2, spec: { ...base, scenario: 'handshake', connections: 8 } },
  { id: 'idle', short: 'Idle connections', title: 'Idle mTLS HTTP/2 connections held open', unit: 'connections', drivers: 4, spec: { ...base, scenario: 'idle', connections: 0 } },
];

export interface ProfileSettings {
  readonly warmupMs: number;
  readonly durationMs: number;
  /** Per driver per phase. */
  readonly maxOps: number;
  readonly idleConnections: number;
  /** Each scenario runs this many times, targets interleaved; the best round counts. */
  readonly rounds: number;
}

export const PROFILES: Record<Profile, ProfileSettings> = {
  quick: { warmupMs: 1000, durationMs: 3000, maxOps: 400_000, idleConnections: 2000, rounds: 2 },
  full: { warmupMs: 2000, durationMs: 8000, maxOps: 2_000_000, idleConnections: 10_000, rounds: 2 },
};

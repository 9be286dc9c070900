/**
 * The messages the primary and its proxy workers exchange over the cluster
 * IPC channel (JSON: every field is plain data). The primary owns what must
 * exist once (OVMS, the admin port, the certificate watch); each worker owns
 * its connections and upstream sessions.
 */
import type { AddressInfo } from 'node:net';
import type { Config } from './config.js';
import type { ListenerName } from './observer.js';
import type { UserAccount } from './privileges.js';
import type { MetricsJson } from './metrics-aggregate.js';
import type { TlsTexts } from './tls-material.js';

/** Entrypoint mode: OVMS's loopback ports, which change when one was taken before OVMS bound it. */
export type UpstreamPorts = { readonly grpc?: number; readonly rest?: number };

/** Primary -> worker. */
export type ToWorker =
  | {
      readonly type: 'start';
      readonly config: Config;
      /** The set the primary validated last: a worker never reads the files, which may be broken by now. */
      readonly tls: TlsTexts;
      /** Started as root: the user the worker becomes once its listeners are up. */
      readonly dropTo?: UserAccount | undefined;
      /** Entrypoint mode: calls wait for OVMS; `notReady` is the reason while it is not ready. */
      readonly gated: boolean;
      readonly notReady?: string | undefined;
      /**
       * What a drain this worker starts on a signal of its own may take (a terminal's Ctrl-C reaches every
       * worker): the primary's stop budget, which in the entrypoint keeps OVMS's share of the shutdown timeout.
       */
      readonly drainMs: number;
      readonly ports?: UpstreamPorts | undefined;
    }
  | { readonly type: 'upstream'; readonly notReady?: string | undefined; readonly ports?: UpstreamPorts | undefined }
  /** The primary validated a new certificate set: load it and close revoked connections. */
  | { readonly type: 'reload'; readonly tls: TlsTexts }
  | { readonly type: 'metrics'; readonly id: number }
  /** Are you alive? (A worker that answers nothing for long is stuck: see workers.ts.) */
  | { readonly type: 'ping' }
  | { readonly type: 'drain'; readonly timeoutMs: number };

/** Worker -> primary. */
export type FromWorker =
  /**
   * The worker listens for messages now. Node drops IPC messages that arrive
   * before a 'message' listener exists, and loading the modules takes a
   * while: the primary sends `start` only in answer to this.
   */
  | { readonly type: 'hello' }
  | { readonly type: 'listening'; readonly addresses: Readonly<Partial<Record<ListenerName, readonly AddressInfo[]>>> }
  /** Startup failed; `code` is an OvmsMtlsError code when the user can fix it (a port in use). */
  | { readonly type: 'failed'; readonly message: string; readonly code?: string | undefined }
  | { readonly type: 'metrics'; readonly id: number; readonly metrics: MetricsJson }
  /** `room`: a connection handed to it now would be taken, not closed at its open-files limit (fd-headroom.ts). */
  | { readonly type: 'pong'; readonly room: boolean }
  /**
   * Drained, about to exit: its counters as they end. The primary keeps them in the sums; as last
   * scraped, the calls it finished since (in the drain, mostly) fell out of /metrics.
   */
  | { readonly type: 'final'; readonly metrics: MetricsJson };

export function isMessage<T extends { type: string }>(value: unknown): value is T {
  return typeof value === 'object' && value !== null && typeof (value as { type?: unknown }).type === 'string';
}

import { ACCESS_EVENTS, clipped, type Logger } from './log.js';
import { NOOP_OBSERVER, type ProxyObserver } from './observer.js';
import { accessLineWriter } from './access-line.js';
import { LOAD_BALANCER_CHECK, SERVER_CERTIFICATE_EXPIRED, handshakeFailureDetail } from './handshake-failures.js';
import { RepeatBudget, type RepeatLimit } from './repeat-budget.js';
import type { MinTlsVersion } from './config.js';

/**
 * Node resets such a stream inside its HTTP/2 layer (RST_STREAM ENHANCE_YOUR_CALM for a header list
 * over the limit, PROTOCOL_ERROR for a malformed one) and tells no JavaScript code: the client sees
 * the reset (grpc-js: RESOURCE_EXHAUSTED "Bandwidth exhausted or memory limit exceeded"), and
 * without this line the operator saw nothing at all.
 */
function unseenResetsMessage(streams: number, skippedIds: number | undefined): string {
  const count = skippedIds === undefined ? `${streams}` : `At most ${streams}`;
  const skipped = skippedIds === undefined ? '' : `. The client also skipped ${skippedIds} stream id(s), more than what it sent could have opened (ids need only rise; no client library skips them)`;
  return `${count} HTTP/2 request(s) on this connection were reset by Node before the proxy saw them (no access line): most likely a header list over --mtls_max_header_size (HTTP/2 counts 32 bytes more per field); else a malformed request, or more at once than --mtls_max_concurrent_streams or --mtls_max_session_memory allow${skipped}`;
}

/**
 * nghttp2 cannot decode a header name or value longer than 64 KiB as sent (a compile-time limit of its
 * HPACK decoder, far above any --mtls_max_header_size it could be reset under): it ends the connection
 * with GOAWAY(COMPRESSION_ERROR), and the client sees every call on it fail (grpc-js: INTERNAL
 * "Received RST_STREAM with code 9"). Node tells no JavaScript code of that either. Malformed HPACK
 * ends it the same way and looks the same from here; real client libraries send the large field.
 */
function undecodableFieldMessage(streams: number): string {
  return `${streams} HTTP/2 request(s) on this connection carried a header block Node's HTTP/2 decoder cannot decode: a header field larger than 64 KiB, which it never reads, or malformed HPACK (a broken or hostile client). It ended the whole connection (GOAWAY COMPRESSION_ERROR), and the requests in flight on it were cut too. Header lists are limited to --mtls_max_header_size; send large data in the body`;
}

/**
 * A client that stopped reading (SIGSTOP, a debugger, a wedged process) or vanished without a FIN or reset
 * reaching us, while an answer was flowing to it: backpressure had held its connection and its model-server
 * request for as long as that lasted. nginx's send_timeout closes such a connection too.
 */
function unresponsiveMessage(waitingBytes: number, idleTimeoutMs: number): string {
  return `the client took none of the bytes waiting for it (${waitingBytes} in the proxy, more in the kernel's buffers), and sent nothing, for ${idleTimeoutMs / 1000} s (--mtls_idle_timeout): closed; the requests in flight on it were cut (proxy_closed_unresponsive)`;
}

/**
 * In relay mode the proxy answers no PINGs and holds no calls: the model server's GOAWAY with an error
 * is the one word on why a client's connection was ended, and C-core's most common one is the client's to fix.
 */
function upstreamGoAwayMessage(code: string, debug: string | undefined): string {
  const said = `the model server ended a relayed connection with GOAWAY ${code}${debug ? ` (${debug})` : ''}`;
  if (code === 'ENHANCE_YOUR_CALM' && debug === 'too_many_pings') return `${said}: the client sends keepalive PINGs more often than the model server allows; raise the client's keepalive time or stop its pings without calls`;
  return `${said}; the client's calls on it were ended or must be retried on a new connection`;
}

/**
 * A refused client chose the names and the serial number in its certificate, and OpenSSL takes
 * certificates of up to 100 KiB: a self-made one made each refusal line about 90 KB long (its
 * subject, and its issuer in the message; a serial of 30,000 bytes, 60,000 hex digits), many log
 * bytes per handshake, lines split by log collectors (16 KiB) and, in the entrypoint, past
 * PIPE_BUF, where OVMS's lines can land inside ours (log.ts). Real names and serials are far
 * shorter than these bounds (RFC 5280: 64 characters a CN, 20 octets a serial). At 3 UTF-8 bytes
 * a character at most, the line stays under PIPE_BUF.
 */
const REFUSED_SUBJECT_CHARS = 256;
const REFUSED_SERIAL_CHARS = 64;
const REFUSAL_DETAIL_CHARS = 768;

/** What the summary of held-back lines says: how many, and that the metric has every one. */
function heldBackMessage(count: number, limit: RepeatLimit, what: 'failed handshake' | 'refused client'): string {
  const seconds = limit.windowMs / 1000;
  const counted = count === 1 ? `1 more ${what} with this reason on this listener within the last ${seconds} s was` : `${count} more ${what}s with this reason on this listener within the last ${seconds} s were`;
  return `${counted} not logged one by one (at most ${limit.perWindow} lines each ${seconds} s per reason and listener); ovms_mtls_handshakes_total counts every one`;
}

export interface LoggingObserverOptions {
  readonly accessLog: boolean;
  /** How many failed or refused handshake lines of one kind are written in full; default: repeat-budget.ts. */
  readonly repeats?: RepeatLimit | undefined;
  /** Named in the line of a client that has no TLS version in common with the proxy; default 1.2. */
  readonly minTlsVersion?: MinTlsVersion | undefined;
}

/** The logging observer, and what it has held back written out (at shutdown). */
export type LoggingObserver = ProxyObserver & { flushHeldLines(): void };

/** Access lines at info, refusals at warn: the log says who was refused and why. */
export function loggingObserver(logger: Logger, options: LoggingObserverOptions): LoggingObserver {
  // Children carry the event name already serialized: an access line costs one object less to copy and write.
  const accessLine = accessLineWriter(logger.child({ event: ACCESS_EVENTS.request }), 'request');
  const relayLines = logger.child({ event: ACCESS_EVENTS.relayed });
  // Handshakes anyone can fail or have refused, as often as they like: see repeat-budget.ts.
  const handshakeLines = new RepeatBudget(options.repeats);
  return {
    ...NOOP_OBSERVER,
    flushHeldLines: () => handshakeLines.flush(),
    handshakeRefused(listener, refusal, remote, fullSubject, serial) {
      const level = refusal.error === undefined ? 'warn' : 'error';
      handshakeLines.offer(`refused ${listener} ${refusal.reason}`, () => {
        const subject = fullSubject === undefined ? undefined : clipped(fullSubject, REFUSED_SUBJECT_CHARS);
        const shortSerial = serial === undefined ? undefined : clipped(serial, REFUSED_SERIAL_CHARS);
        const detail = clipped(refusal.detail, REFUSAL_DETAIL_CHARS);
        logger[level]({ event: 'client_refused', listener, remote, reason: refusal.reason, subject, serial: shortSerial, error: refusal.error }, detail);
      }, (suppressed, limit) => {
        logger[level]({ event: 'client_refused', listener, reason: refusal.reason, suppressed }, heldBackMessage(suppressed, limit, 'refused client'));
      });
    },
    handshakeFailed(listener, code, remote, why) {
      // Most failures are one client's business; an expired server certificate fails every client; a load balancer's check is routine.
      const level = code === SERVER_CERTIFICATE_EXPIRED ? 'error' : code === LOAD_BALANCER_CHECK ? 'debug' : 'info';
      handshakeLines.offer(`failed ${listener} ${code}`, () => {
        const detail = handshakeFailureDetail(code, options.minTlsVersion);
        logger[level]({ event: 'handshake_failed', listener, remote, reason: code }, why === undefined ? detail : `${detail}: ${why}`);
      }, (suppressed, limit) => {
        logger[level]({ event: 'handshake_failed', listener, reason: code, suppressed }, heldBackMessage(suppressed, limit, 'failed handshake'));
      });
    },
    upstreamError(listener, code, detail) {
      logger.warn({ event: 'upstream_error', listener, reason: code }, detail);
    },
    unseenResets(record) {
      logger.warn({ event: 'h2_streams_reset_unseen', ...record }, record.goAway ? undecodableFieldMessage(record.streams) : unseenResetsMessage(record.streams, record.skippedIds));
    },
    h2SessionFailed(record) {
      const { byProxy, ...fields } = record;
      logger.warn({ event: 'h2_session_error', ...fields }, `${byProxy ? 'The proxy' : 'Node'} ended this client's HTTP/2 connection: ${record.message}; the requests in flight on it were cut (${record.code})`);
    },
    clientUnresponsive(record) {
      const { waitingBytes, idleTimeoutMs, ...client } = record;
      logger.warn({ event: 'client_unresponsive', ...client, waitingBytes }, unresponsiveMessage(waitingBytes, idleTimeoutMs));
    },
    request(record) {
      if (!options.accessLog) return;
      accessLine(record);
    },
    relayed(record) {
      const { upstreamGoAway, upstreamGoAwayDebug } = record;
      if (upstreamGoAway !== undefined && upstreamGoAway !== 'NO_ERROR') {
        const who = { listener: record.listener, remote: record.remote, subject: record.subject, serial: record.serial };
        logger.warn({ event: 'upstream_goaway', ...who, code: upstreamGoAway, debug: upstreamGoAwayDebug }, upstreamGoAwayMessage(upstreamGoAway, upstreamGoAwayDebug));
      }
      if (!options.accessLog) return;
      relayLines.info(record, 'relayed connection closed');
    },
  };
}

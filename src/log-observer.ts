import { ACCESS_EVENTS, type Logger } from './log.js';
import { NOOP_OBSERVER, type ProxyObserver } from './observer.js';
import { accessLineWriter } from './access-line.js';
import { handshakeFailureDetail } from './handshake-failures.js';

/** Access lines at info, refusals at warn: the log says who was refused and why. */
export function loggingObserver(logger: Logger, options: { accessLog: boolean }): ProxyObserver {
  // Children carry the event name already serialized: an access line costs one object less to copy and write.
  const accessLine = accessLineWriter(logger.child({ event: ACCESS_EVENTS.request }), 'request');
  const relayLines = logger.child({ event: ACCESS_EVENTS.relayed });
  return {
    ...NOOP_OBSERVER,
    handshakeRefused(listener, refusal, remote, subject) {
      logger.warn({ event: 'client_refused', listener, remote, reason: refusal.reason, subject }, refusal.detail);
    },
    handshakeFailed(listener, code, remote) {
      logger.info({ event: 'handshake_failed', listener, remote, reason: code }, handshakeFailureDetail(code));
    },
    upstreamError(listener, code) {
      logger.warn({ event: 'upstream_error', listener, reason: code }, 'upstream error');
    },
    request(record) {
      if (!options.accessLog) return;
      accessLine(record);
    },
    relayed(record) {
      if (!options.accessLog) return;
      relayLines.info(record, 'relayed connection closed');
    },
  };
}

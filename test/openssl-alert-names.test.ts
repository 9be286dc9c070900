/**
 * OpenSSL 3.2 (Node 22 and 24) renamed the alerts it called "sslv3 alert ..." to "ssl/tls alert ...".
 * The real handshakes that show it run in validity-moments.test.ts and probe.test.ts, on the Node that
 * runs them; here both spellings, as Node 20 and Node 24 give them, whatever Node runs the tests.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { handshakeFailureDetail, handshakeFailureReason, judgedWithServedCertificate, SERVER_CERTIFICATE_EXPIRED } from '../src/handshake-failures.js';
import { diagnoseTlsError, type TlsTarget } from '../src/probe-tls.js';

/** What Node's TLS socket emits for a client's alert, as each OpenSSL names it. */
function alertError(code: string, message: string): NodeJS.ErrnoException {
  return Object.assign(new Error(message), { code });
}

const SPELLINGS = [
  alertError('ERR_SSL_SSLV3_ALERT_CERTIFICATE_EXPIRED', 'error:0A000415:SSL routines::sslv3 alert certificate expired'),
  alertError('ERR_SSL_SSL/TLS_ALERT_CERTIFICATE_EXPIRED', 'error:0A000415:SSL routines::ssl/tls alert certificate expired'),
];

test('a client\'s certificate_expired alert is one reason under either OpenSSL name, a stable metrics label, and read as our expired certificate', () => {
  for (const err of SPELLINGS) {
    const reason = handshakeFailureReason(err);
    assert.equal(reason, 'sslv3_alert_certificate_expired', err.code);
    assert.match(handshakeFailureDetail(reason), /^the client refused our server certificate: .* \(TLS alert certificate_expired\)$/);
    assert.equal(judgedWithServedCertificate(reason, true), SERVER_CERTIFICATE_EXPIRED, err.code);
  }
});

test('probe: a handshake_failure alert to the hello is named a protocol-layer refusal under either OpenSSL name', () => {
  const target: TlsTarget = { host: '127.0.0.1', port: 8000, servername: 'localhost', cert: Buffer.alloc(0), key: Buffer.alloc(0), ca: Buffer.alloc(0), timeoutMs: 1000 };
  for (const [code, message] of [
    ['ERR_SSL_SSLV3_ALERT_HANDSHAKE_FAILURE', 'error:0A000410:SSL routines::sslv3 alert handshake failure:../deps/openssl/openssl/ssl/record/rec_layer_s3.c:1605:SSL alert number 40'],
    ['ERR_SSL_SSL/TLS_ALERT_HANDSHAKE_FAILURE', 'error:0A000410:SSL routines::ssl/tls alert handshake failure:../deps/openssl/openssl/ssl/record/rec_layer_s3.c:918:SSL alert number 40'],
  ] as const) {
    const diagnosis = diagnoseTlsError(alertError(code, message), target, 'hello sent');
    assert.equal(diagnosis.layer, 'protocol', code);
    assert.match(diagnosis.cause, /^the server refused the TLS hello \(TLS alert "handshake failure"\) before sending its certificate/, code);
  }
});

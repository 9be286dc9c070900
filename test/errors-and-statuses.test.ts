import { test } from 'node:test';
import assert from 'node:assert/strict';
import { constants } from 'node:http2';
import { ChildProcessError, ConfigError, ListenError, OvmsMtlsError, TlsMaterialError, isUserError } from '../src/errors.js';
import { encodeGrpcMessage, statusForReset } from '../src/grpc-status.js';
import { describeUpstreamError } from '../src/upstream-errors.js';

test('every user error class has its stable code and is recognised as a user error', () => {
  const table: [OvmsMtlsError, string][] = [
    [new ConfigError('x'), 'ERR_CONFIG'],
    [new TlsMaterialError('x'), 'ERR_TLS_MATERIAL'],
    [new ListenError('x'), 'ERR_LISTEN'],
    [new ChildProcessError('x'), 'ERR_OVMS_CHILD'],
  ];
  for (const [err, code] of table) {
    assert.equal(err.code, code);
    assert.equal(isUserError(err), true);
  }
  assert.equal(isUserError(new Error('bug')), false);
});

test('RST_STREAM codes map to the gRPC statuses the gRPC spec gives them', () => {
  assert.deepEqual(statusForReset(constants.NGHTTP2_REFUSED_STREAM), { status: 14, name: 'REFUSED_STREAM' });
  assert.deepEqual(statusForReset(constants.NGHTTP2_CANCEL), { status: 1, name: 'CANCEL' });
  assert.deepEqual(statusForReset(constants.NGHTTP2_ENHANCE_YOUR_CALM), { status: 8, name: 'ENHANCE_YOUR_CALM' });
  assert.deepEqual(statusForReset(constants.NGHTTP2_INADEQUATE_SECURITY), { status: 7, name: 'INADEQUATE_SECURITY' });
  assert.deepEqual(statusForReset(constants.NGHTTP2_INTERNAL_ERROR), { status: 13, name: 'INTERNAL_ERROR' });
  assert.equal(statusForReset(99).status, 13);
});

test('grpc-message is percent-encoded outside printable ASCII and for % only', () => {
  assert.equal(encodeGrpcMessage('plain text: ok'), 'plain text: ok');
  assert.equal(encodeGrpcMessage('100% ü'), '100%25 %C3%BC');
});

test('upstream failures become readable messages that name the upstream and never echo internal text', () => {
  const upstream = { host: '127.0.0.1', port: 9000 };
  assert.match(describeUpstreamError(upstream, { code: 'ECONNREFUSED' }).message, /^upstream 127\.0\.0\.1:9000 refused the connection/);
  assert.match(describeUpstreamError(upstream, { code: 'ECONNRESET' }).message, /closed the connection/);
  // Out of descriptors is the proxy's limit to raise, not a failing model server ("upstream ... failed (EMFILE)" said so).
  assert.deepEqual(describeUpstreamError(upstream, { code: 'EMFILE' }), {
    code: 'EMFILE',
    message: 'cannot connect to upstream 127.0.0.1:9000: this proxy is at its open-files limit (raise ulimit -n / the nofile limit)',
  });
  assert.match(describeUpstreamError(upstream, { code: 'ENFILE' }).message, /^cannot connect to upstream 127\.0\.0\.1:9000: the machine is out of file descriptors/);
  assert.equal(describeUpstreamError(upstream, new Error('secret internal detail')).message, 'upstream 127.0.0.1:9000 failed (UPSTREAM_ERROR)');
  // undici's codes (the REST forwarder's client) become ours.
  assert.deepEqual(describeUpstreamError(upstream, { code: 'UND_ERR_CONNECT_TIMEOUT' }), {
    code: 'UPSTREAM_CONNECT_TIMEOUT',
    message: 'upstream 127.0.0.1:9000 did not accept the connection in time (--mtls_upstream_connect_timeout)',
  });
  assert.deepEqual(describeUpstreamError(upstream, { code: 'UND_ERR_SOCKET' }), { code: 'UPSTREAM_CLOSED', message: 'upstream 127.0.0.1:9000 closed the connection before answering' });
  // The same code when undici itself drops the connection over what the upstream sent.
  assert.deepEqual(describeUpstreamError(upstream, Object.assign(new Error('bad response'), { code: 'UND_ERR_SOCKET' })), {
    code: 'UPSTREAM_BAD_RESPONSE',
    message: 'upstream 127.0.0.1:9000 sent a response that is not valid HTTP/1.1',
  });
});

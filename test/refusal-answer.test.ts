/**
 * What a client whose certificate the proxy refuses is told (src/refusal-answer.ts), and that
 * such a connection never stays open: the client may not read, or may never close its side.
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { connect as tlsConnect } from 'node:tls';
import * as grpc from '@grpc/grpc-js';
import type { TestPki } from './helpers/pki.js';
import { assertRefusedCall, grpcClients, h2Request, h2Session, https1, refusedWording, startProxyFixture, startTestProxy, tlsClientOptions, type StartedProxy } from './helpers/harness.js';
import { eventually } from './helpers/ops.js';
import { unary } from '../src/demo/grpc-client.js';
import { issueClientCert, type Issued } from '../src/x509.js';
import type { ModelServer } from '../src/demo/model-server.js';

let pki: TestPki;
let upstream: ModelServer;
let front: StartedProxy;
let closeAll: () => Promise<void>;
/** Issued by the trusted client CA, but not on the allow-list. */
let stranger: Issued;

before(async () => {
  ({ pki, upstream, front, close: closeAll } = await startProxyFixture({ allow: { cn: ['client'] } }));
  stranger = await issueClientCert({ issuer: pki.clientCa, commonName: 'stranger' });
});
after(() => closeAll());

async function refusedCall(client: Issued): Promise<grpc.ServiceError> {
  const c = grpcClients(front.grpcAddress, pki, client);
  try {
    return await unary(c.kserve, 'ServerLive', {}).then(() => assert.fail('the call should be refused'), (e: grpc.ServiceError) => e);
  } finally {
    c.close();
  }
}

describe('a refused client is told why', () => {
  test('gRPC: PERMISSION_DENIED naming not_allowed for a client outside the allow-list, UNAUTHENTICATED naming expired for an expired certificate', async () => {
    assertRefusedCall(await refusedCall(stranger), 'not_allowed');
    assertRefusedCall(await refusedCall(pki.expiredClient), 'expired');
    assert.equal((await https1(front.restPort, pki, { path: '/v2/health/live' })).status, 200, 'the allowed client is served');
  });

  test('REST over HTTP/2: every request sent at once gets 403 naming the reason (HEAD without a body), then the connection closes', async () => {
    const session = h2Session(front.restPort, pki, pki.revokedClient);
    const closed = once(session, 'close');
    const [get, post, head] = await Promise.all([
      h2Request(session, { ':method': 'GET', ':path': '/v2/health/ready' }),
      h2Request(session, { ':method': 'POST', ':path': '/v2/models/dummy/infer', 'content-type': 'application/json' }, '{"inputs":[]}'),
      h2Request(session, { ':method': 'HEAD', ':path': '/v2/health/ready' }),
    ]);
    for (const answer of [get, post]) {
      assert.equal(answer.headers[':status'], 403);
      assert.match((JSON.parse(answer.body.toString()) as { error: string }).error, refusedWording('revoked'));
    }
    assert.equal(head.headers[':status'], 403);
    assert.equal(head.body.length, 0);
    await closed;
  });

  test('REST over HTTP/2: a client that keeps asking on its refused connection gets 403 each time, and a GOAWAY before the connection ends (not a cut under a request)', { timeout: 30_000 }, async () => {
    const session = h2Session(front.restPort, pki, pki.revokedClient);
    let goaway = false;
    session.on('goaway', () => (goaway = true));
    session.on('error', () => {});
    const closed = once(session, 'close');
    const statuses = new Set<unknown>();
    // Back to back, never quiet: before, no GOAWAY came, and the connection was cut under a request after 2 s.
    while (!session.closed && !session.destroyed && !goaway) {
      const answer = await h2Request(session, { ':method': 'GET', ':path': '/v2/health/ready' }).catch((err: Error) => err.message);
      statuses.add(typeof answer === 'string' ? answer : answer.headers[':status']);
    }
    await closed;
    assert.equal(goaway, true, 'the connection ended without a GOAWAY');
    // A request that crossed the GOAWAY is refused unprocessed (REFUSED_STREAM): the client sends it again on a new connection.
    assert.deepEqual([...statuses].filter((s) => s !== 'Stream closed with error code NGHTTP2_REFUSED_STREAM'), [403]);
  });

  test('gRPC content on the REST port and plain HTTP/2 on the gRPC port are answered in their own protocol', async () => {
    const session = h2Session(front.grpcPort, pki, stranger);
    try {
      const answer = await h2Request(session, { ':method': 'GET', ':path': '/v2/health/ready' });
      assert.equal(answer.headers[':status'], 403);
      assert.match((JSON.parse(answer.body.toString()) as { error: string }).error, refusedWording('not_allowed'));
    } finally {
      session.close();
    }
    const rest = h2Session(front.restPort, pki, stranger);
    try {
      const call = await h2Request(rest, { ':method': 'POST', ':path': '/inference.GRPCInferenceService/ServerLive', 'content-type': 'application/grpc', te: 'trailers' });
      assert.equal(call.headers['grpc-status'], String(grpc.status.PERMISSION_DENIED));
      assert.match(decodeURIComponent(String(call.headers['grpc-message'])), refusedWording('not_allowed'));
    } finally {
      rest.close();
    }
  });
});

describe('a refused connection never stays open', () => {
  test('an HTTP/2 client that sends no request is closed by the proxy', { timeout: 20_000 }, async () => {
    const session = h2Session(front.restPort, pki, pki.expiredClient);
    await once(session, 'connect');
    await once(session, 'close');
  });

  test('an HTTP/1.1 client that neither reads its answer nor closes gives its connection slot back', { timeout: 30_000 }, async () => {
    const limited = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, limits: { maxConnections: 1 } });
    try {
      // Paused and never ended: it takes in neither the answer nor the FIN behind it.
      const stuck = tlsConnect({ host: '127.0.0.1', port: limited.restPort, ...tlsClientOptions(pki, pki.expiredClient), ALPNProtocols: ['http/1.1'] });
      stuck.on('error', () => {});
      await once(stuck, 'secureConnect');
      await limited.logs.waitFor((l) => l.event === 'client_refused' && l.reason === 'expired');
      try {
        await eventually(async () => {
          const answer = await https1(limited.restPort, pki, { path: '/v2/health/live' }).catch(() => undefined);
          return answer?.status === 200;
        }, 'a valid client served once the refused connection is gone');
      } finally {
        stuck.destroy();
      }
    } finally {
      await limited.proxy.shutdown(1000);
    }
  });
});

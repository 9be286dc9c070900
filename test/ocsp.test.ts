import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import type * as grpc from '@grpc/grpc-js';
import { X509Certificate } from 'node:crypto';
import { connect, type TLSSocket } from 'node:tls';
import { connect as netConnect, type Socket } from 'node:net';
import { once } from 'node:events';
import { spawn } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { assertRefusedAnswer, assertRefusedCall, baseConfig, grpcClients, h2Request, h2Session, https1, startTestProxy, startUpstream, tlsClientOptions, type LogLine, type ProxySetup, type StartedProxy } from './helpers/harness.js';
import { issueForOcsp, startOcspResponder, type OcspResponderStandIn } from './helpers/ocsp-responder.js';
import { eventually } from './helpers/ops.js';
import { CLIENT_PREFACE, invalidFrameFlood } from './helpers/raw-h2.js';
import { readToClose } from './helpers/raw-http1.js';
import { unary } from '../src/demo/grpc-client.js';
import type { ModelServer } from '../src/demo/model-server.js';
import { OcspChecker, type OcspSettings } from '../src/ocsp.js';
import { EMPTY_ALLOW_LIST, parseCommonConfig } from '../src/config.js';
import { loadTlsMaterialSync } from '../src/tls-material.js';
import { freeLoopbackPorts } from '../src/ports.js';
import { startCli } from './helpers/cli.js';
import { ConfigError } from '../src/errors.js';
import { createCa, type Issued } from '../src/x509.js';

let pki: TestPki;
let upstream: ModelServer;
/** Signs with the client CA's own key. */
let responder: OcspResponderStandIn;

before(async () => {
  [pki, upstream] = await Promise.all([createTestPki(), startUpstream()]);
  responder = await startOcspResponder(pki.clientCa);
});
after(async () => {
  await responder.close();
  await upstream.close();
  await pki.cleanup();
});

const LEAF: OcspSettings = { mode: 'leaf', timeoutMs: 5_000 };
let clients = 0;

/** A client certificate of the client CA whose Authority Information Access names `url` (the stand-in's by default; null: none). */
function ocspClient(url: string | null = responder.url, issuer: Issued = pki.clientCa): Promise<Issued & { name: string }> {
  const name = `ocsp client ${++clients}`;
  return issueForOcsp({ issuer, commonName: name, kind: 'client', ...(url === null ? {} : { ocspUrl: url }) }).then((issued) => ({ ...issued, name }));
}

/** A proxy checking OCSP (no CRL: OCSP alone, as some PKIs publish), REST and gRPC, in front of the model server. */
async function withProxy(setup: Omit<ProxySetup, 'pki' | 'upstream'>, body: (front: StartedProxy) => Promise<void>): Promise<void> {
  const front = await startTestProxy({ pki, upstream: { restPort: upstream.restPort!, grpcPort: upstream.grpcPort! }, tls: { crl: undefined }, ocsp: LEAF, ...setup });
  try {
    await body(front);
  } finally {
    await front.proxy.shutdown(1000);
  }
}

/** One REST request as `client`: 'accepted', or the client_refused line, whose reason the 403 names too. */
async function attempt(front: StartedProxy, client: Issued & { name: string }): Promise<'accepted' | LogLine> {
  const response = await https1(front.restPort, pki, { path: '/v2/health/live', client });
  if (response.status === 200) return 'accepted';
  const line = await front.logs.waitFor((l) => l.event === 'client_refused' && l.subject === `CN=${client.name}`);
  assertRefusedAnswer(response, String(line.reason));
  return line;
}

function escaped(text: string): string {
  return text.replace(/[/.]/g, '\\$&');
}

/** Refused for `reason`, the log line's words matching each of `words`. */
async function assertRefused(front: StartedProxy, client: Issued & { name: string }, reason: string, ...words: RegExp[]): Promise<void> {
  const outcome = await attempt(front, client);
  assert.notEqual(outcome, 'accepted', `${client.name} must be refused`);
  const line = outcome as LogLine;
  assert.equal(line.reason, reason, line.msg);
  for (const word of words) assert.match(line.msg, word);
}

/** One gRPC call (KServe ServerLive) as `client`: 'served', or the error a refused call ends with. */
async function grpcCall(front: StartedProxy, client: Issued): Promise<'served' | grpc.ServiceError> {
  const c = grpcClients(front.grpcAddress, pki, client);
  try {
    return await unary(c.kserve, 'ServerLive', {}).then((r) => (assert.equal(r.response.live, true), 'served' as const), (e: grpc.ServiceError) => e);
  } finally {
    c.close();
  }
}

async function assertCallRefused(front: StartedProxy, client: Issued, reason: string): Promise<void> {
  const outcome = await grpcCall(front, client);
  assert.notEqual(outcome, 'served', 'the call must be refused');
  assertRefusedCall(outcome as grpc.ServiceError, reason);
}

describe('--mtls_ocsp leaf', () => {
  test('a client the responder calls good is served over REST (HTTP/1.1 and HTTP/2) and gRPC, after one lookup of its serial', async () => {
    const client = await ocspClient();
    await withProxy({}, async (front) => {
      assert.equal(await attempt(front, client), 'accepted');
      const session = h2Session(front.restPort, pki, client);
      try {
        assert.equal((await h2Request(session, { ':path': '/v2/health/live' })).headers[':status'], 200);
      } finally {
        session.close();
      }
      assert.equal(await grpcCall(front, client), 'served');
      assert.deepEqual(responder.asked.filter((serial) => serial === client.serialHex), [client.serialHex]);
    });
  });

  test('a client the responder calls revoked is refused over REST and gRPC, naming the responder and the revocation', async () => {
    const client = await ocspClient();
    responder.behaviour.statuses.set(client.serialHex, 'revoked');
    await withProxy({}, async (front) => {
      await assertRefused(front, client, 'ocsp_revoked', /revoked by its OCSP responder/, new RegExp(`OCSP responder ${escaped(responder.url)}: revoked at \\d{4}-`));
      await assertCallRefused(front, client, 'ocsp_revoked');
      // The revoked answer is kept too: asked once for both connections.
      assert.equal(responder.asked.filter((serial) => serial === client.serialHex).length, 1);
    });
  });

  test('a client the responder does not know is refused (ocsp_unknown)', async () => {
    const client = await ocspClient();
    responder.behaviour.statuses.set(client.serialHex, 'unknown');
    await withProxy({}, async (front) => {
      await assertRefused(front, client, 'ocsp_unknown', /: it does not know this certificate/);
      await assertCallRefused(front, client, 'ocsp_unknown');
    });
  });

  test('connections of one certificate, at once and after, make one lookup; another certificate its own', async () => {
    const [client, other] = await Promise.all([ocspClient(), ocspClient()]);
    await withProxy({}, async (front) => {
      const together = await Promise.all([attempt(front, client), attempt(front, client), attempt(front, client)]);
      assert.deepEqual(together, ['accepted', 'accepted', 'accepted']);
      assert.equal(await attempt(front, client), 'accepted');
      assert.equal(await attempt(front, other), 'accepted');
      assert.equal(responder.asked.filter((serial) => serial === client.serialHex).length, 1);
      assert.equal(responder.asked.filter((serial) => serial === other.serialHex).length, 1);
    });
  });

  test('a certificate naming no OCSP responder, or an https:// one, with no --mtls_ocsp_responder, is refused saying so', async () => {
    const [client, https] = await Promise.all([ocspClient(null), ocspClient('https://127.0.0.1:9/ocsp')]);
    await withProxy({}, async (front) => {
      await assertRefused(front, client, 'ocsp_no_responder', /names no OCSP responder/, /--mtls_ocsp_responder/);
      await assertRefused(front, https, 'ocsp_no_responder', /https:\/\/127\.0\.0\.1:9\/ocsp, is not an http:\/\/ URL/, /--mtls_ocsp_responder/);
    });
  });

  test('--mtls_ocsp_responder is asked instead of the responder the certificate names', async () => {
    // The certificate names the discard port, where nothing answers.
    const [client, bare] = await Promise.all([ocspClient('http://127.0.0.1:9/ocsp'), ocspClient(null)]);
    await withProxy({ ocsp: { ...LEAF, responder: responder.url } }, async (front) => {
      assert.equal(await attempt(front, client), 'accepted');
      assert.equal(await attempt(front, bare), 'accepted');
      assert.ok(responder.asked.includes(client.serialHex) && responder.asked.includes(bare.serialHex));
    });
  });

  test('the address of --mtls_ocsp_responder is logged but not told to a refused client, which reads the option\'s name; a responder its certificate names, it is told', async () => {
    const [overridden, named] = await Promise.all([ocspClient('http://127.0.0.1:9/ocsp'), ocspClient()]);
    for (const client of [overridden, named]) responder.behaviour.statuses.set(client.serialHex, 'revoked');
    await withProxy({ ocsp: { ...LEAF, responder: responder.url } }, async (front) => {
      const answer = await https1(front.restPort, pki, { path: '/v2/health/live', client: overridden });
      assertRefusedAnswer(answer, 'ocsp_revoked');
      assert.ok(!answer.body.includes(responder.url), answer.body);
      assert.match(answer.body, /OCSP responder --mtls_ocsp_responder: revoked at \d{4}-/);
      const call = await grpcCall(front, overridden);
      assert.notEqual(call, 'served');
      assert.match((call as grpc.ServiceError).details, /OCSP responder --mtls_ocsp_responder: revoked at/);
      assert.ok(!(call as grpc.ServiceError).details.includes(responder.url));
      const line = await front.logs.waitFor((l) => l.event === 'client_refused' && l.subject === `CN=${overridden.name}`);
      assert.match(line.msg, new RegExp(`OCSP responder ${escaped(responder.url)}: revoked at`));
    });
    await withProxy({}, async (front) => {
      const answer = await https1(front.restPort, pki, { path: '/v2/health/live', client: named });
      assertRefusedAnswer(answer, 'ocsp_revoked');
      assert.ok(answer.body.includes(`OCSP responder ${responder.url}: revoked at`), answer.body);
    });
  });

  test('relay modes (REST and gRPC): a good client is served, a revoked one refused', async () => {
    const [good, revoked] = await Promise.all([ocspClient(), ocspClient()]);
    responder.behaviour.statuses.set(revoked.serialHex, 'revoked');
    await withProxy({ restMode: 'relay', grpcMode: 'relay' }, async (front) => {
      assert.equal(await attempt(front, good), 'accepted');
      await assertRefused(front, revoked, 'ocsp_revoked');
      assert.equal(await grpcCall(front, good), 'served');
      await assertCallRefused(front, revoked, 'ocsp_revoked');
    });
  });
});

/**
 * A proxy whose responder holds its answer until `own.release()`, and a client of it (AIA naming that responder)
 * whose REST request waits for its lookup: `use` gets them once the responder has been asked.
 */
async function withLookupHeld(use: (front: StartedProxy, socket: TLSSocket, own: OcspResponderStandIn, client: Issued & { name: string }, raw: Socket) => Promise<void>): Promise<void> {
  const own = await startOcspResponder(pki.clientCa);
  own.behaviour.mode = 'hold';
  try {
    const client = await ocspClient(own.url);
    await withProxy({}, async (front) => {
      // A TCP connection of the test's own, for the reset a TLS socket cannot send.
      const raw = netConnect({ host: '127.0.0.1', port: front.restPort });
      const socket = connect({ socket: raw, ...tlsClientOptions(pki, client), ALPNProtocols: ['http/1.1'] });
      socket.on('error', () => {});
      await once(socket, 'secureConnect');
      socket.write('GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n');
      await eventually(() => own.asked.includes(client.serialHex), 'the lookup');
      await use(front, socket, own, client, raw);
    });
  } finally {
    await own.close();
  }
}

describe('fails closed: a status that cannot be learnt or trusted refuses the client, naming the cause', () => {
  /** A stand-in of its own per case, so that its behaviour is the case's alone. */
  async function refusedWith(setUp: (r: OcspResponderStandIn) => void, reason: string, ...words: RegExp[]): Promise<void> {
    const own = await startOcspResponder(pki.clientCa);
    try {
      setUp(own);
      const client = await ocspClient(own.url);
      await withProxy({ ocsp: { ...LEAF, timeoutMs: 300 } }, async (front) => {
        await assertRefused(front, client, reason, new RegExp(escaped(own.url)), ...words);
      });
    } finally {
      await own.close();
    }
  }

  test('the responder is down: connection refused', async () => {
    await refusedWith((r) => void r.close(), 'ocsp_unavailable', /connection refused/);
  });

  test('the responder does not answer within --mtls_ocsp_timeout', async () => {
    await refusedWith((r) => (r.behaviour.mode = 'hold'), 'ocsp_unavailable', /no answer within 0\.3 s/);
  });

  test('the responder answers HTTP 500', async () => {
    await refusedWith((r) => (r.behaviour.mode = 'http500'), 'ocsp_unavailable', /answered HTTP 500/);
  });

  test('the responder answers tryLater', async () => {
    await refusedWith((r) => (r.behaviour.mode = 'tryLater'), 'ocsp_unavailable', /answered tryLater/);
  });

  test('the responder answers bytes that are no OCSP response', async () => {
    await refusedWith((r) => (r.behaviour.mode = 'garbage'), 'ocsp_invalid', /cannot be read/);
  });

  test('the answer is signed by a stranger (a CA that did not issue the certificate)', async () => {
    await refusedWith((r) => (r.behaviour.signer = { issued: pki.otherCa, include: false }), 'ocsp_invalid', /bad signature/);
  });

  test('the answer is stale: its nextUpdate has passed', async () => {
    await refusedWith((r) => {
      r.behaviour.thisUpdateMs = -7_200_000;
      r.behaviour.nextUpdateMs = -3_600_000;
    }, 'ocsp_invalid', /stale/, /nextUpdate/);
  });

  test('the answer\'s thisUpdate is in the future', async () => {
    await refusedWith((r) => (r.behaviour.thisUpdateMs = 3_600_000), 'ocsp_invalid', /thisUpdate .* is in the future/);
  });

  test('a delegated responder certificate without the OCSPSigning extended key usage', async () => {
    const delegate = await issueForOcsp({ issuer: pki.clientCa, commonName: 'responder without EKU', kind: 'noEku' });
    await refusedWith((r) => (r.behaviour.signer = { issued: delegate, include: true }), 'ocsp_invalid', /CN=responder without EKU/, /id-kp-OCSPSigning/);
  });

  test('a responder certificate with OCSPSigning but issued by another CA', async () => {
    const delegate = await issueForOcsp({ issuer: pki.otherCa, commonName: 'foreign responder', kind: 'ocspSigning' });
    await refusedWith((r) => (r.behaviour.signer = { issued: delegate, include: true }), 'ocsp_invalid', /CN=foreign responder/, /did not issue/);
  });

  test('a client that resets its connection while its lookup is under way is neither served nor kept among the live connections', async () => {
    await withLookupHeld(async (front, socket, own, client, raw) => {
      raw.resetAndDestroy();
      await once(socket, 'close');
      // One turn of the event loop's poll phase: the proxy reads the reset before the answer is sent.
      await new Promise((resolve) => setImmediate(resolve));
      own.release();
      // The good answer, now kept, serves the next connection; the first is gone, and nothing of it is held.
      assert.equal(await attempt(front, client), 'accepted');
      assert.equal(own.asked.length, 1);
      const [rest] = front.proxy.listeners().filter((l) => l.name === 'rest');
      await eventually(() => rest!.connections.size === 0, 'no live connection left');
      assert.equal(front.logs.lines.filter((l) => l.event === 'access').length, 1);
    });
  });
});

test('a drain that begins while a client waits for its lookup: once the answer comes, its request is answered with connection: close, and the drain ends', async () => {
  await withLookupHeld(async (front, socket, own) => {
    const drained = front.proxy.shutdown(20_000);
    own.release();
    const answer = await readToClose(socket);
    assert.match(answer, /^HTTP\/1\.1 200 /);
    assert.match(answer, /\r\nconnection: close\r\n/i);
    await drained;
    assert.equal(front.logs.lines.filter((l) => l.event === 'shutdown_timeout').length, 0);
  });
});

// The bytes a client sends while its lookup is under way reach nghttp2 in one piece once it is admitted: a stream and
// a flood after it ended the session before the stream's event, whose error, with no listener yet, ended the process.
test('gRPC: a flood sent while the client\'s lookup is under way ends that connection with a warn line once it is admitted, not the process', async () => {
  const own = await startOcspResponder(pki.clientCa);
  own.behaviour.mode = 'hold';
  try {
    const client = await ocspClient(own.url);
    await withProxy({}, async (front) => {
      const socket = connect({ port: front.grpcPort, host: '127.0.0.1', ...tlsClientOptions(pki, client), ALPNProtocols: ['h2'] });
      socket.on('error', () => {});
      // Read, so that the proxy's close reaches 'close' here.
      socket.resume();
      const closed = once(socket, 'close');
      await once(socket, 'secureConnect');
      socket.write(Buffer.concat([CLIENT_PREFACE, invalidFrameFlood()]));
      await eventually(() => own.asked.includes(client.serialHex), 'the lookup');
      own.release();
      await closed;
      const ended = await front.logs.waitFor((l) => l.event === 'h2_session_error');
      assert.deepEqual([ended.listener, ended.code], ['grpc', 'ERR_HTTP2_TOO_MANY_INVALID_FRAMES']);
    });
  } finally {
    await own.close();
  }
});

/** OpenSSL's own responder (`openssl ocsp`), answering from a CA index file: a real peer's encoding, not ours. */
async function withOpensslResponder(signer: Issued, statuses: Record<string, 'V' | 'R'>, use: (url: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'ovms-mtls-openssl-ocsp-'));
  const day = (offset: number) => new Date(Date.now() + offset * 86_400_000).toISOString().replace(/[-:T]/g, '').slice(2, 14) + 'Z';
  // index.txt: status, expiry, revocation date, serial (upper-case hex), file name, subject.
  const index = Object.entries(statuses).map(([serial, status]) => [status, day(30), status === 'R' ? day(-1) : '', serial.toUpperCase(), 'unknown', '/CN=x'].join('\t'));
  await Promise.all([
    writeFile(join(dir, 'index.txt'), index.join('\n') + '\n'),
    writeFile(join(dir, 'ca.pem'), pki.clientCa.certPem),
    writeFile(join(dir, 'signer.pem'), signer.certPem),
    writeFile(join(dir, 'signer.key'), signer.keyPem),
  ]);
  const [port] = (await freeLoopbackPorts(1)) as [number];
  // OpenSSL 3.0's -port takes a port alone (it listens on every address); the proxy asks it on 127.0.0.1.
  const server = spawn('openssl', ['ocsp', '-index', join(dir, 'index.txt'), '-port', `${port}`, '-CA', join(dir, 'ca.pem'), '-rsigner', join(dir, 'signer.pem'), '-rkey', join(dir, 'signer.key'), '-nmin', '5', '-ignore_err'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let said = '';
  for (const output of [server.stdout, server.stderr]) output.on('data', (chunk: Buffer) => (said += chunk.toString()));
  try {
    // Not probed by a connection of our own: OpenSSL serves one connection at a time, and an empty one held it up.
    await eventually(() => said.includes('waiting for OCSP client connections'), 'openssl ocsp listening');
    await use(`http://127.0.0.1:${port}/`);
  } finally {
    server.kill();
    await rm(dir, { recursive: true, force: true });
  }
}

test('OpenSSL\'s own responder (openssl ocsp), signing as the CA and as a delegated responder: good served, revoked refused naming it, a serial it does not list unknown', async () => {
  const delegate = await issueForOcsp({ issuer: pki.clientCa, commonName: 'openssl delegated responder', kind: 'ocspSigning' });
  for (const signer of [pki.clientCa, delegate]) {
    const [good, revoked, stranger] = await Promise.all([ocspClient(null), ocspClient(null), ocspClient(null)]);
    await withOpensslResponder(signer, { [good.serialHex]: 'V', [revoked.serialHex]: 'R' }, (url) => withProxy({ ocsp: { ...LEAF, responder: url } }, async (front) => {
      assert.equal(await attempt(front, good), 'accepted');
      await assertRefused(front, revoked, 'ocsp_revoked', /revoked at /);
      await assertRefused(front, stranger, 'ocsp_unknown');
    }));
  }
});

test('a reload while a client waits for its lookup, taking it out of the allow-list: the good answer does not let it in, it is refused not_allowed', async () => {
  await withLookupHeld(async (front, socket, own, client) => {
    front.proxy.reloadTls(loadTlsMaterialSync(baseConfig({ pki }).tls), { ...EMPTY_ALLOW_LIST, cn: ['someone else'] });
    own.release();
    const answer = await readToClose(socket);
    assert.match(answer, /^HTTP\/1\.1 403 /);
    const line = await front.logs.waitFor((l) => l.event === 'client_refused' && l.subject === `CN=${client.name}`);
    assert.equal(line.reason, 'not_allowed');
    assert.match(answer, /not_allowed/);
  });
});

test('a delegated responder certificate issued by the CA for OCSP signing is trusted', async () => {
  const own = await startOcspResponder(await issueForOcsp({ issuer: pki.clientCa, commonName: 'delegated responder', kind: 'ocspSigning' }));
  own.behaviour.signer.include = true;
  try {
    const [good, revoked] = await Promise.all([ocspClient(own.url), ocspClient(own.url)]);
    own.behaviour.statuses.set(revoked.serialHex, 'revoked');
    await withProxy({}, async (front) => {
      assert.equal(await attempt(front, good), 'accepted');
      await assertRefused(front, revoked, 'ocsp_revoked');
    });
  } finally {
    await own.close();
  }
});

describe('--mtls_ocsp chain', () => {
  /** An intermediate CA the root's responder answers for, and a client of it its own responder answers for. */
  async function chain() {
    const rootResponder = await startOcspResponder(pki.clientCa);
    const intermediate = await issueForOcsp({ issuer: pki.clientCa, commonName: `ocsp intermediate ${++clients}`, kind: 'ca', ocspUrl: rootResponder.url });
    const leafResponder = await startOcspResponder(intermediate);
    const leaf = await ocspClient(leafResponder.url, intermediate);
    return { rootResponder, leafResponder, intermediate, client: { ...leaf, certPem: leaf.certPem + intermediate.certPem } };
  }

  test('an intermediate CA its responder calls revoked refuses its clients in chain mode; leaf mode asks about the leaf alone', async () => {
    const { rootResponder, leafResponder, intermediate, client } = await chain();
    rootResponder.behaviour.statuses.set(intermediate.serialHex, 'revoked');
    try {
      await withProxy({ ocsp: { ...LEAF, mode: 'chain' } }, async (front) => {
        await assertRefused(front, client, 'ocsp_revoked', /CA CN=ocsp intermediate/);
      });
      await withProxy({}, async (front) => {
        assert.equal(await attempt(front, client), 'accepted');
      });
      assert.deepEqual(rootResponder.asked, [intermediate.serialHex]);
      assert.deepEqual(leafResponder.asked, [client.serialHex, client.serialHex]);
    } finally {
      await Promise.all([rootResponder.close(), leafResponder.close()]);
    }
  });

  test('a chain whose every certificate is good is served; the root itself is not asked about', async () => {
    const { rootResponder, leafResponder, intermediate, client } = await chain();
    try {
      await withProxy({ ocsp: { ...LEAF, mode: 'chain' } }, async (front) => {
        assert.equal(await attempt(front, client), 'accepted');
      });
      assert.deepEqual(rootResponder.asked, [intermediate.serialHex]);
      assert.deepEqual(leafResponder.asked, [client.serialHex]);
    } finally {
      await Promise.all([rootResponder.close(), leafResponder.close()]);
    }
  });
});

test('answers signed with an RSA issuer key (sha256WithRSAEncryption, as AD CS signs) are verified: good and revoked', async () => {
  const rsaCa = await createCa({ commonName: 'ocsp RSA CA', key: 'rsa2048' });
  const own = await startOcspResponder(rsaCa);
  try {
    const [good, revoked] = await Promise.all([ocspClient(own.url, rsaCa), ocspClient(own.url, rsaCa)]);
    own.behaviour.statuses.set(revoked.serialHex, 'revoked');
    const checker = new OcspChecker(LEAF);
    const ca = new X509Certificate(rsaCa.certPem);
    assert.equal(await checker.judge([new X509Certificate(good.certPem), ca]), undefined);
    assert.equal((await checker.judge([new X509Certificate(revoked.certPem), ca]))?.reason, 'ocsp_revoked');
    // And a key of another type at the same name does not verify them.
    own.behaviour.signer = { issued: await createCa({ commonName: 'ocsp RSA CA' }), include: false };
    const fresh = await ocspClient(own.url, rsaCa);
    assert.equal((await checker.judge([new X509Certificate(fresh.certPem), ca]))?.reason, 'ocsp_invalid');
  } finally {
    await own.close();
  }
});

test('a change of the client CAs forgets the answers verified under the old ones; the same CAs keep them', async () => {
  const client = await ocspClient();
  const checker = new OcspChecker(LEAF);
  const lookups = () => responder.asked.filter((serial) => serial === client.serialHex).length;
  const [leaf, ca, other] = [client.certPem, pki.clientCa.certPem, pki.otherCa.certPem].map((pem) => new X509Certificate(pem));
  checker.trust([ca!]);
  assert.equal(await checker.judge([leaf!, ca!]), undefined);
  checker.trust([ca!]);
  assert.equal(await checker.judge([leaf!, ca!]), undefined);
  assert.equal(lookups(), 1);
  checker.trust([ca!, other!]);
  responder.behaviour.statuses.set(client.serialHex, 'revoked');
  assert.equal((await checker.judge([leaf!, ca!]))?.reason, 'ocsp_revoked');
  assert.equal(lookups(), 2);
});

test('the proxy command with two workers takes --mtls_ocsp, and --mtls_ocsp_responder from its OVMS_MTLS_* variable', async () => {
  const [restPort] = (await freeLoopbackPorts(1)) as [number];
  const [good, revoked] = await Promise.all([ocspClient(null), ocspClient(null)]);
  responder.behaviour.statuses.set(revoked.serialHex, 'revoked');
  const files = ['--mtls_cert', pki.paths['server.pem']!, '--mtls_key', pki.paths['server.key']!, '--mtls_client_ca', pki.paths['client_cert_ca.pem']!];
  const cli = startCli(['proxy', '--mtls_workers', '2', '--rest_port', String(restPort), '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', `127.0.0.1:${upstream.restPort}`, ...files, '--mtls_ocsp', 'leaf'], {
    env: { OVMS_MTLS_OCSP_RESPONDER: responder.url },
  });
  try {
    await Promise.race([cli.logs.waitFor((l) => l.event === 'workers_listening'), cli.exited.then((code) => assert.fail(`the proxy exited (${code}): ${cli.stderr()}`))]);
    assert.equal((await https1(restPort, pki, { path: '/v2/health/live', client: good })).status, 200);
    assertRefusedAnswer(await https1(restPort, pki, { path: '/v2/health/live', client: revoked }), 'ocsp_revoked');
    const line = await cli.logs.waitFor((l) => l.event === 'client_refused');
    assert.equal(line.reason, 'ocsp_revoked');
    assert.match(line.msg, new RegExp(`OCSP responder ${escaped(responder.url)}: revoked at`));
  } finally {
    if (cli.child.exitCode === null) cli.child.kill('SIGTERM');
    assert.equal(await cli.exited, 0, cli.stderr());
  }
});

describe('options', () => {
  const base = { mtls_cert: 'a.pem', mtls_key: 'a.key', mtls_client_ca: 'ca.pem' };
  const refused = (message: string) => (err: unknown) => err instanceof ConfigError && err.message === message;

  test('off by default; leaf and chain with the responder and the timeout', () => {
    assert.equal(parseCommonConfig(base).ocsp, undefined);
    assert.equal(parseCommonConfig({ ...base, mtls_ocsp: 'off' }).ocsp, undefined);
    assert.deepEqual(parseCommonConfig({ ...base, mtls_ocsp: 'leaf' }).ocsp, { mode: 'leaf', responder: undefined, timeoutMs: 5000 });
    assert.deepEqual(parseCommonConfig({ ...base, mtls_ocsp: 'chain', mtls_ocsp_responder: 'http://ocsp.example.com:2560/', mtls_ocsp_timeout: 2 }).ocsp, { mode: 'chain', responder: 'http://ocsp.example.com:2560/', timeoutMs: 2000 });
  });

  test('bad values are refused naming the option and what to give', () => {
    assert.throws(() => parseCommonConfig({ ...base, mtls_ocsp: 'on' }), refused("--mtls_ocsp: 'on' is not one of off, leaf, chain"));
    assert.throws(() => parseCommonConfig({ ...base, mtls_ocsp: 'leaf', mtls_ocsp_responder: 'ocsp.example.com' }), refused("--mtls_ocsp_responder: 'ocsp.example.com' is not a URL (give an http:// URL, e.g. http://ocsp.example.com/ or http://10.0.0.5:2560/ocsp)"));
    assert.throws(() => parseCommonConfig({ ...base, mtls_ocsp: 'leaf', mtls_ocsp_responder: 'https://ocsp.example.com/' }), /--mtls_ocsp_responder: 'https:\/\/ocsp.example.com\/' is not http:\/\//);
    assert.throws(() => parseCommonConfig({ ...base, mtls_ocsp: 'leaf', mtls_ocsp_responder: 'http://u:p@ocsp.example.com/' }), /holds a user name or password/);
    assert.throws(() => parseCommonConfig({ ...base, mtls_ocsp: 'leaf', mtls_ocsp_timeout: 0 }), /--mtls_ocsp_timeout: '0' would time out at once/);
    assert.throws(() => parseCommonConfig({ ...base, mtls_ocsp_responder: 'http://ocsp.example.com/' }), refused('--mtls_ocsp_responder applies only with --mtls_ocsp leaf or chain: add --mtls_ocsp, or drop --mtls_ocsp_responder'));
    assert.throws(() => parseCommonConfig({ ...base, mtls_ocsp_timeout: 3 }), refused('--mtls_ocsp_timeout applies only with --mtls_ocsp leaf or chain: add --mtls_ocsp, or drop --mtls_ocsp_timeout'));
  });
});

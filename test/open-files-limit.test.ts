/**
 * The proxy under a small open-files limit (`prlimit --nofile`, as a container's nofile ulimit
 * sets it): excess clients are refused at once with one warning naming the limit, open
 * connections, the admin port and certificate reloads keep working, and new clients are
 * served again once connections end.
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { runCli, startCli } from './helpers/cli.js';
import { startUpstream, tlsClientOptions } from './helpers/harness.js';
import { readUntil } from './helpers/raw-http1.js';
import { eventually, httpGet } from './helpers/ops.js';
import { freeLoopbackPorts } from '../src/ports.js';
import { loadFailedForLimit, tooFewFilesToLoad } from '../src/cli/launch.js';
import type { ModelServer } from '../src/demo/model-server.js';

// Not lower: Node's module loader reads the program's modules many at a time as it starts, and
// under 64 a worker failed to load them (EMFILE) once the program grew by one module.
const LIMIT = 128;
/** Far more than LIMIT descriptors could hold: the proxy must have refused one by then. */
const MAX_CONNECTIONS_TRIED = 3 * LIMIT;
/** A handshake neither done nor refused by then is one that waits for ever. */
const HANDSHAKE_BOUND_MS = 15_000;

let pki: TestPki;
let upstream: ModelServer;

before(async () => {
  [pki, upstream] = await Promise.all([createTestPki(), startUpstream()]);
});

after(() => Promise.all([upstream.close(), pki.cleanup()]));

type Outcome = { served: TLSSocket } | { refused: true } | { waiting: true };

function handshake(port: number): Promise<Outcome> {
  return new Promise((resolve) => {
    const socket = tlsConnect({ host: '127.0.0.1', port, ALPNProtocols: ['http/1.1'], ...tlsClientOptions(pki) });
    socket.on('error', () => {});
    const timer = setTimeout(() => {
      socket.destroy();
      resolve({ waiting: true });
    }, HANDSHAKE_BOUND_MS);
    socket.once('secureConnect', () => {
      clearTimeout(timer);
      resolve({ served: socket });
    });
    socket.once('close', () => {
      clearTimeout(timer);
      resolve({ refused: true });
    });
  });
}

/** Fails the test instead of letting it wait past the file's timeout. */
function within<T>(promise: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const bound = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`no ${what} after ${HANDSHAKE_BOUND_MS} ms`)), HANDSHAKE_BOUND_MS)));
  return Promise.race([promise, bound]).finally(() => clearTimeout(timer));
}

async function getConfig(socket: TLSSocket): Promise<string> {
  socket.write('GET /v1/config HTTP/1.1\r\nhost: localhost\r\n\r\n');
  return (await readUntil(socket, /\r\n\r\n/)).split('\r\n')[0]!;
}

describe(`the proxy under an open-files limit of ${LIMIT}`, () => {
  // Two workers: a worker at its limit could not take the connections the primary handed it,
  // and the primary stopped handing it any: new clients waited for ever, also once freed.
  for (const workers of [1, 2]) {
    test(`--mtls_workers ${workers}: excess clients are refused with one line naming the limit; open connections, the admin port and reloads work; freed, new clients are served`, async () => {
      const [grpcPort, restPort, adminPort] = (await freeLoopbackPorts(3)) as [number, number, number];
      const cli = startCli([
        'proxy', `--port=${grpcPort}`, '--grpc_bind_address=127.0.0.1', `--mtls_grpc_upstream=127.0.0.1:${upstream.grpcPort}`,
        `--rest_port=${restPort}`, '--rest_bind_address=127.0.0.1', `--mtls_rest_upstream=127.0.0.1:${upstream.restPort}`, `--mtls_workers=${workers}`,
        `--mtls_admin_port=${adminPort}`,
        '--mtls_cert', pki.paths['server.pem']!, '--mtls_key', pki.paths['server.key']!, '--mtls_client_ca', pki.paths['client_cert_ca.pem']!,
      ], { wrap: ['prlimit', `--nofile=${LIMIT}:${LIMIT}`] });
      const held: TLSSocket[] = [];
      try {
        await Promise.race([
          cli.logs.waitFor((l) => l.event === (workers > 1 ? 'workers_listening' : 'listening') && (workers > 1 || l['listener'] === 'rest')),
          cli.exited.then((code) => Promise.reject(new Error(`the proxy exited with ${code}: ${cli.stderr()}`))),
        ]);
        let refused = false;
        while (!refused && held.length < MAX_CONNECTIONS_TRIED) {
          const outcome = await handshake(restPort);
          assert.ok(!('waiting' in outcome), `connection ${held.length + 1}: neither served nor refused after ${HANDSHAKE_BOUND_MS} ms`);
          if ('served' in outcome) held.push(outcome.served);
          else refused = true;
        }
        assert.ok(refused, `${held.length} connections served under a limit of ${LIMIT}`);
        // Said 200 while every new client was closed at once: the Service kept sending clients that other replicas could serve.
        // With two workers, one full beside one with room stays ready: fill both.
        await eventually(async () => {
          const readiness = await within(httpGet(adminPort, '/readyz'), '/readyz answer');
          if (readiness.status === 503) return /at the open-files limit/.test(readiness.body);
          const outcome = await handshake(restPort);
          if ('served' in outcome) held.push(outcome.served);
          return false;
        }, '/readyz to answer 503 at the open-files limit', 30_000);
        const warning = await within(cli.logs.waitFor((l) => l.event === 'open_files_exhausted'), 'open_files_exhausted line');
        assert.equal(warning.level, 'warn');
        assert.equal(warning['limit'], LIMIT);
        assert.match(String(warning.msg), new RegExp(`open-files limit ${LIMIT} .*raise the limit \\(ulimit -n`));

        assert.equal(await getConfig(held[0]!), 'HTTP/1.1 200 OK', 'a connection opened before the limit still works');
        // Without the spare, one process at its limit reset the probes (a liveness probe would restart it) and could not read the files to reload.
        assert.equal((await within(httpGet(adminPort, '/healthz'), '/healthz answer')).status, 200);
        const metrics = (await within(httpGet(adminPort, '/metrics'), '/metrics answer')).body;
        assert.match(metrics, /ovms_mtls_handshakes_total\{listener="rest",result="refused",reason="open_files_limit"\} [1-9]/, 'the refusals are counted');
        cli.child.kill('SIGHUP');
        await within(cli.logs.waitFor((l) => l.event === 'reloaded' || l.event === 'reload_failed'), 'reload outcome');
        assert.equal(cli.logs.lines.filter((l) => l.event === 'reload_failed').length, 0, 'the reload could open its files');

        for (const socket of held.splice(0)) socket.destroy();
        await eventually(async () => (await within(httpGet(adminPort, '/readyz'), '/readyz answer')).status === 200, '/readyz to answer 200 once connections closed', 30_000);
        await eventually(async () => {
          const outcome = await handshake(restPort);
          assert.ok(!('waiting' in outcome), 'a new client waits although every other connection has closed');
          if (!('served' in outcome)) return false;
          held.push(outcome.served);
          return (await getConfig(outcome.served)) === 'HTTP/1.1 200 OK';
        }, 'a new client to be served once the connections closed');
        assert.equal(cli.child.exitCode, null, 'the proxy is still running');
        assert.ok(cli.logs.lines.filter((l) => l.event === 'open_files_exhausted').length <= workers, 'one warning per process, not one per refusal');
      } finally {
        for (const socket of held) socket.destroy();
        cli.child.kill('SIGTERM');
        await cli.exited;
      }
    });
  }
});

// Node's loader opens the program's modules many at a time: under a limit this small the start
// failed before main() ran, with Node's stack trace (EMFILE on some module) and no word of the limit.
// How many descriptors Node itself needs differs by version (Node 24 starts under 23, Node 20 under
// 19), and so does what its loader makes of EMFILE (Node 24: ERR_INVALID_PACKAGE_CONFIG; Node 20, at
// some limits and depending on timing: ERR_MODULE_NOT_FOUND for yargs, ERR_UNSUPPORTED_DIR_IMPORT for
// escalade/sync, see the next test): every limit from Node's own start up to one that runs is tried.
test('under an open-files limit too small to load the program: one line naming the limit and how to raise it, exit 1, at every limit where the program has begun to load', async () => {
  const explained: number[] = [];
  for (let limit = 16; ; limit += 1) {
    assert.ok(limit <= 200, 'check --help ran under no limit up to 200');
    const res = await runCli(['check', '--help'], { wrap: ['prlimit', `--nofile=${limit}:${limit}`] });
    if (res.code === 0) break;
    // Node itself did not get as far as the program's modules (it could not open bin/ovms-mtls, say): nothing of ours ran.
    if (!/\/(dist|node_modules)\//.test(res.stderr) && !res.stderr.startsWith('ovms-mtls: ')) continue;
    assert.equal(res.stderr, `ovms-mtls: ${tooFewFilesToLoad(limit)}\n`, `limit ${limit}`);
    assert.equal(res.code, 1);
    explained.push(limit);
  }
  assert.ok(explained.length > 0, 'no limit under which the program began to load and could not finish');
  assert.match(`ovms-mtls: ${tooFewFilesToLoad(20)}`, /open-files limit \(20\) is too small to load the program: raise it to 1024 or more \(ulimit -n 1024;/);
});

// The loader reads each package.json synchronously while its reads of module sources, started many at a time, hold
// descriptors: one that fails for EMFILE is taken for a package.json that is not there. Node 20 then resolves as if the
// package had no "exports" or "main", and what fails is named by how that package is laid out: an ESM import of a
// package's subpath (yargs's of escalade/sync) ERR_UNSUPPORTED_DIR_IMPORT, a require() from CommonJS (@peculiar/x509's
// of its asn1 packages, tslib, pino-pretty's of dateformat) MODULE_NOT_FOUND. Seen in a loaded run of the test above
// (limit 54: Node's stack trace for escalade/sync), and for every such package.json with an EMFILE injected at its
// open (strace -e inject=openat:error=EMFILE -P .../package.json).
test('every error Node 20 turns an EMFILE on a package.json into is taken for the limit under a small one, and none under a large one', () => {
  for (const code of ['ERR_INVALID_PACKAGE_CONFIG', 'ERR_MODULE_NOT_FOUND', 'MODULE_NOT_FOUND', 'ERR_UNSUPPORTED_DIR_IMPORT']) {
    const err = Object.assign(new Error(`the loader's ${code}`), { code });
    assert.equal(loadFailedForLimit(err, 54), true, `${code} under a limit of 54`);
    // Where the limit leaves plenty, such an error is a broken install: Node's own message says more than ours would.
    assert.equal(loadFailedForLimit(err, 65_536), false, `${code} under a limit of 65536`);
  }
  assert.equal(loadFailedForLimit(Object.assign(new Error('too many open files'), { code: 'EMFILE' }), 65_536), true);
  assert.equal(loadFailedForLimit(new SyntaxError('Unexpected token'), 54), false);
});

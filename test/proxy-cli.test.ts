import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer, connect as tcpConnect } from 'node:net';
import * as grpc from '@grpc/grpc-js';
import { casWithNamesOf, type TestPki } from './helpers/pki.js';
import { JAVA_CA_NAMES_LIMIT } from '../src/ca-names.js';
import { runCli, runCommand, startCli, type LongRunningCli } from './helpers/cli.js';
import { grpcClients, h2Session, https1, negotiatedVersion, startUpstreamFixture, tlsClientOptions, type LogLine } from './helpers/harness.js';
import { issueClientCert } from '../src/x509.js';
import { connect as tlsConnect } from 'node:tls';
import { GateBoard, sseEvents } from './helpers/sse.js';
import { freeLoopbackPorts } from '../src/ports.js';
import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { eventually } from './helpers/ops.js';
import { unary, type EchoReply } from '../src/demo/grpc-client.js';
import { CHAT_REPLY_WORDS } from '../src/demo/openai-chat.js';
import type { ModelServer } from '../src/demo/model-server.js';

const HOLD_OPEN = fileURLToPath(new URL('./fixtures/hold-open.js', import.meta.url));
const JUDGEMENT_DEFECT = fileURLToPath(new URL('./fixtures/judgement-defect.js', import.meta.url));

let pki: TestPki;
let upstream: ModelServer;
let board = new GateBoard();
let closeAll: () => Promise<void>;

before(async () => ({ pki, upstream, close: closeAll } = await startUpstreamFixture({ sseGate: (i) => board.wait(i) })));

after(async () => {
  board.openAll();
  await closeAll();
});

function tlsFlags(): string[] {
  return ['--mtls_cert', pki.paths['server.pem']!, '--mtls_key', pki.paths['server.key']!, '--mtls_client_ca', pki.paths['client_cert_ca.pem']!];
}

/** Starts the proxy on `bundle` as --mtls_client_ca until it listens, then stops it: the one `event` warning it logged on the way. */
async function warningsAtStart(bundle: string, event: string): Promise<LogLine> {
  const [restPort] = (await freeLoopbackPorts(1)) as [number];
  const cli = startCli(['proxy', '--rest_port', String(restPort), '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', '127.0.0.1:9', '--mtls_workers', '1', ...tlsFlags(), '--mtls_client_ca', bundle]);
  try {
    await cli.logs.waitFor((l) => l.event === 'listening');
    const warned = cli.logs.lines.filter((l) => l.event === event);
    assert.equal(warned.length, 1, JSON.stringify(cli.logs.lines));
    return warned[0]!;
  } finally {
    cli.child.kill('SIGTERM');
    assert.equal(await cli.exited, 0);
  }
}

async function startProxyCli(extra: string[] = [], env: NodeJS.ProcessEnv = {}): Promise<{ cli: LongRunningCli; grpcPort: number; restPort: number }> {
  const [grpcPort, restPort] = (await freeLoopbackPorts(2)) as [number, number];
  const cli = startCli([
    'proxy', `--port=${grpcPort}`, '--grpc_bind_address', '127.0.0.1', '--mtls_grpc_upstream', `127.0.0.1:${upstream.grpcPort}`,
    '--rest_port', String(restPort), '--rest_bind_address=127.0.0.1', `--mtls_rest_upstream=127.0.0.1:${upstream.restPort}`, ...extra,
  ], { env });
  // A proxy that refuses its options exits: the test fails with what it said instead of waiting.
  const exited = cli.exited.then((code) => Promise.reject(new Error(`the proxy exited with ${code}: ${cli.stderr()}`)));
  await Promise.race([cli.logs.waitFor((l) => l.event === 'listening' && l['listener'] === 'rest'), exited]);
  exited.catch(() => {});
  return { cli, grpcPort, restPort };
}

/**
 * Runs `proxy` on a free loopback REST port with `extra` options until it exits, or until it
 * listens (then stops it): a configuration the proxy must refuse shows as `listened: false`.
 */
async function startupOutcome(extra: string[], env: NodeJS.ProcessEnv = {}): Promise<{ listened: boolean; code: number | null; stderr: string }> {
  const [restPort] = (await freeLoopbackPorts(1)) as [number];
  const cli = startCli(['proxy', '--rest_port', String(restPort), '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', '127.0.0.1:9', ...tlsFlags(), ...extra], { env });
  const closed = once(cli.child, 'close');
  const listened = await Promise.race([cli.exited.then(() => false), cli.logs.waitFor((l) => l.event === 'listening').then(() => true)]);
  if (listened) cli.child.kill('SIGTERM');
  const [code] = (await closed) as [number | null];
  return { listened, code, stderr: cli.stderr() };
}

describe('proxy command line', () => {
  test('--help describes the commands and the environment variable naming', async () => {
    const res = await runCli(['--help']);
    assert.equal(res.code, 0);
    assert.match(res.stdout, /ovms-mtls proxy/);
    assert.match(res.stdout, /--mtls_cert[\s\S]*env: OVMS_MTLS_CERT/);
    // It said `--opt value` works for every option: the entrypoint refuses `--mtls_access_log false` (OVMS would get a stray word).
    assert.match(res.stdout, /a flag takes its value\nonly after '=', as OVMS's own do: --mtls_access_log=false \(true\|false\|1\|0\|yes\|no\|on\|off\)/);
    // The values of a choice option, as `proxy --help` lists them: without them `on-failure` was named nowhere here.
    assert.match(res.stdout, /\n {2}--mtls_restart +[^\n]*\(never\|on-failure\) \(default: never\)\n/);
    assert.match(res.stdout, /\n {2}--mtls_log_level +Log level \(fatal\|error\|warn\|info\|debug\|trace\|silent\) \(default: info\)\n/);
    // The budget Node gets is this plus a window per stream the connection may open (http-fronts.ts frontSessionMemory), not per open one.
    assert.match(res.stdout, /--mtls_max_session_memory +HTTP\/2 memory per client connection, in MiB, on top of one stream window for each stream it may open \(--mtls_max_concurrent_streams\)/);
  });

  // The help alone and exit 2 left the user to guess what was wrong (an image started without its args).
  test('no arguments: one line on stderr saying what to give, then the usage, exit 2', async () => {
    const res = await runCli([]);
    assert.equal(res.code, 2);
    assert.equal(res.stderr, "ovms-mtls: nothing to run: give a command (proxy, certs, check, probe, demo) or OVMS's options, as to the ovms command (--port, --rest_port, --model_path ...); the usage follows\n");
    assert.match(res.stdout, /^ovms-mtls \d+\.\d+\.\d+ - [^\n]*\n\nUsage:\n/);
  });

  // Each command's --help was refused as an unknown option (exit 2).
  const commandHelps: [string[], RegExp][] = [
    // Both read OVMS_MTLS_* too, which only the top-level --help said.
    [['proxy', '--help'], /^ovms-mtls proxy --port[\s\S]*\nEvery option can also come from the environment as OVMS_MTLS_<NAME without mtls_> \(--mtls_cert -> OVMS_MTLS_CERT,[\s\S]*\n {2}--mtls_grpc_upstream +proxy mode: host:port/],
    [['check', '-h'], /^ovms-mtls check [\s\S]*\nEvery option can also come from the environment as OVMS_MTLS_[\s\S]*\n {2}--mtls_crl /],
    [['probe', '--help'], /^ovms-mtls probe --host[\s\S]*\n {2}--servername +Name the server certificate must carry \(default: --host\)/],
    [['demo', '--help'], /^ovms-mtls demo [\s\S]*\n {2}--port +Public gRPC port \(default: 9443\)/],
    [['certs', 'init', '--help'], /ovms-mtls certs init [\s\S]*\n {2}--server_name +Server certificate CN[\s\S]*\n {2}--days +Validity in days, 1 to 36500 \(default: 1\)\n/],
  ];
  for (const [argv, expected] of commandHelps) {
    test(`${argv.join(' ')} prints that command's usage and options and exits 0`, async () => {
      const res = await runCli(argv);
      assert.equal(res.stderr, '');
      assert.equal(res.code, 0);
      assert.match(res.stdout, expected);
    });
  }

  test('--version prints the product version', async () => {
    const res = await runCli(['proxy', '--help']).then(() => runCli(['-v']));
    assert.equal(res.code, 0);
    assert.match(res.stdout, /^ovms-mtls \d+\.\d+\.\d+/);
  });

  const cases: [string, () => string[], RegExp][] = [
    ['a missing certificate file', () => ['--port', '1', '--mtls_grpc_upstream', '127.0.0.1:9', '--mtls_cert', '/nonexistent/server.pem', '--mtls_key', pki.paths['server.key']!, '--mtls_client_ca', pki.paths['client_cert_ca.pem']!], /^ovms-mtls: --mtls_cert: \/nonexistent\/server\.pem does not exist/],
    ['a key that does not match the certificate', () => ['--port', '1', '--mtls_grpc_upstream', '127.0.0.1:9', '--mtls_cert', pki.paths['server.pem']!, '--mtls_key', pki.paths['client.key']!, '--mtls_client_ca', pki.paths['client_cert_ca.pem']!], /--mtls_key: .*client\.key does not match --mtls_cert .*server\.pem \(check you mounted the pair\)/],
    // A client certificate as --mtls_cert: the proxy served it and every client failed with "unsuitable certificate purpose".
    ['the client certificate given as the server certificate', () => ['--port', '1', '--mtls_grpc_upstream', '127.0.0.1:9', '--mtls_cert', pki.paths['client.pem']!, '--mtls_key', pki.paths['client.key']!, '--mtls_client_ca', pki.paths['client_cert_ca.pem']!],
      /^ovms-mtls: --mtls_cert: .*client\.pem is not a server certificate \(its extended key usage lacks serverAuth, as a client certificate's does\).*give the server certificate/],
    // The pair swapped: the certificate is read first, and its line said only "holds no PEM certificate".
    ['the key given as the certificate (the pair swapped)', () => ['--port', '1', '--mtls_grpc_upstream', '127.0.0.1:9', '--mtls_cert', pki.paths['server.key']!, '--mtls_key', pki.paths['server.pem']!, '--mtls_client_ca', pki.paths['client_cert_ca.pem']!],
      /^ovms-mtls: --mtls_cert: .*server\.key holds a private key, not a certificate \(--mtls_cert and --mtls_key swapped\?\)\n$/],
    // A leaf as the client CA: the line named the certificate but not what to give instead.
    ['a client certificate given as the client CA', () => ['--port', '1', '--mtls_grpc_upstream', '127.0.0.1:9', '--mtls_cert', pki.paths['server.pem']!, '--mtls_key', pki.paths['server.key']!, '--mtls_client_ca', pki.paths['client.pem']!],
      /^ovms-mtls: --mtls_client_ca: .*client\.pem: certificate #1 \(.*\) is not a CA certificate: give the CA that issues the client certificates \(client_cert_ca\.pem of `ovms-mtls certs init`\)/],
    // The CA certificate as the CRL, its neighbour in the set: the line said to convert it from DER.
    ['the client CA certificate given as the CRL', () => ['--port', '1', '--mtls_grpc_upstream', '127.0.0.1:9', ...tlsFlags(), '--mtls_crl', pki.paths['client_cert_ca.pem']!],
      /^ovms-mtls: --mtls_crl: .*client_cert_ca\.pem holds a certificate, not a CRL \(give the CRL the client CA issues: client_cert_ca\.crl of `ovms-mtls certs init`\)\n$/],
    ['an upstream that is not host:port', () => ['--port', '1', '--mtls_grpc_upstream', 'localhost', ...tlsFlags()], /--mtls_grpc_upstream: 'localhost' is not host:port/],
    // A URL pasted from OVMS's docs got only the generic example; an https:// one did not say the hop to the model server has no TLS.
    ['an upstream given as a URL', () => ['--rest_port', '1', '--mtls_rest_upstream', 'http://127.0.0.1:8000/', ...tlsFlags()],
      /^ovms-mtls: --mtls_rest_upstream: 'http:\/\/127\.0\.0\.1:8000\/' is not host:port \(a URL: give host:port alone, 127\.0\.0\.1:8000\)\n$/],
    ['an upstream given as an https:// URL', () => ['--port', '1', '--mtls_grpc_upstream', 'https://ovms:9000', ...tlsFlags()],
      /^ovms-mtls: --mtls_grpc_upstream: 'https:\/\/ovms:9000' is not host:port \(a URL: give host:port alone, ovms:9000; the model server is reached without TLS, h2c for gRPC and HTTP\/1\.1 for REST\)\n$/],
    // Before: "'unix:///run/ovms.sock' is not host:port (a URL: give host:port alone, :PORT)", and a port out of range
    // named alone ("'0' is not a whole number between 1 and 65535"), without the value it came in.
    ['an upstream given as a unix socket, in gRPC\'s target syntax', () => ['--port', '1', '--mtls_grpc_upstream', 'unix:///run/ovms.sock', ...tlsFlags()],
      /^ovms-mtls: --mtls_grpc_upstream: 'unix:\/\/\/run\/ovms\.sock' is not host:port \(a unix socket: the proxy reaches the model server over TCP only; give its host:port, e\.g\. 127\.0\.0\.1:9000\)\n$/],
    ['an upstream given as a socket path', () => ['--rest_port', '1', '--mtls_rest_upstream', '/run/ovms.sock', ...tlsFlags()],
      /^ovms-mtls: --mtls_rest_upstream: '\/run\/ovms\.sock' is not host:port \(a unix socket: the proxy reaches/],
    ['an upstream port out of range', () => ['--port', '1', '--mtls_grpc_upstream', 'ovms:0', ...tlsFlags()], /^ovms-mtls: --mtls_grpc_upstream: 'ovms:0': port 0 is not between 1 and 65535\n$/],
    ['an unknown --mtls_ option', () => ['--port', '1', '--mtls_grpc_upstream', '127.0.0.1:9', '--mtls_bogus', 'x', ...tlsFlags()], /unknown option --mtls_bogus/],
    ['a misspelt option, which names the option meant', () => ['--port', '1', '--mtls_grpc_upstream', '127.0.0.1:9', '--mtls_alow_cn', 'alice', ...tlsFlags()],
      /^ovms-mtls: unknown option --mtls_alow_cn \(did you mean --mtls_allow_cn\?\) \(see `ovms-mtls proxy --help`\)\n$/],
    ['our option with dashes, which names the spelling that works', () => ['--port', '1', '--mtls_grpc_upstream', '127.0.0.1:9', '--mtls-cert', 'x', ...tlsFlags()],
      /^ovms-mtls: unknown option --mtls-cert \(did you mean --mtls_cert\?\) \(see `ovms-mtls proxy --help`\)\n$/],
    ['a stray word after a boolean option', () => ['--port', '1', '--mtls_grpc_upstream', '127.0.0.1:9', '--mtls_access_log', 'maybe', ...tlsFlags()],
      /^ovms-mtls: unexpected argument 'maybe'; options take their value as --name VALUE or --name=VALUE \(see `ovms-mtls proxy --help`\)\n$/],
    ['no public port at all', () => [...tlsFlags()], /no public port: give --port \(gRPC\) and\/or --rest_port \(REST\)/],
    ['a port that is not a number', () => ['--port=abc', '--mtls_grpc_upstream', '127.0.0.1:9', ...tlsFlags()], /--port: 'abc' is not a whole number between 0 and 65535/],
    ['no upstream connection at all', () => ['--port', '1', '--mtls_grpc_upstream', '127.0.0.1:9', '--mtls_grpc_upstream_connections', '0', ...tlsFlags()], /^ovms-mtls: --mtls_grpc_upstream_connections: '0' is not a whole number between 1 and 64/],
    ['an unknown gRPC mode', () => ['--port', '1', '--mtls_grpc_upstream', '127.0.0.1:9', '--mtls_grpc_mode', 'fast', ...tlsFlags()], /--mtls_grpc_mode: 'fast' is not one of terminate, relay/],
    // Its example was the gRPC port, 9000, which a REST upstream pasted from it would point at.
    ['a listener without its upstream', () => ['--rest_port', '8443', ...tlsFlags()], /^ovms-mtls: --mtls_rest_upstream is required with --rest_port \(host:port of the model server, e\.g\. 127\.0\.0\.1:8000\)\n$/],
    // Only the entrypoint drops privileges: `proxy` took --mtls_user and went on serving as root.
    ['--mtls_user, which only the entrypoint honours', () => ['--mtls_user', 'nobody', ...tlsFlags()], /^ovms-mtls: --mtls_user applies to the OVMS entrypoint only: start `ovms-mtls proxy` as the user it should run as/],
    ['--mtls_user=NAME, in that spelling too', () => ['--mtls_user=nobody', ...tlsFlags()], /^ovms-mtls: --mtls_user applies to the OVMS entrypoint only/],
    ['--mtls_ovms_hang_timeout, which watches the OVMS the entrypoint starts', () => ['--port', '1', '--mtls_grpc_upstream', '127.0.0.1:9', '--mtls_ovms_hang_timeout', '60', ...tlsFlags()], /^ovms-mtls: --mtls_ovms_hang_timeout applies to the OVMS entrypoint only: `ovms-mtls proxy` starts no OVMS/],
  ];
  for (const [label, args, message] of cases) {
    test(`${label} exits 2 with one clear line and no stack trace`, async () => {
      const res = await runCli(['proxy', ...args()]);
      assert.equal(res.code, 2);
      assert.match(res.stderr, message);
      assert.equal(res.stderr.trim().split('\n').length, 1, res.stderr);
      assert.equal(res.stdout, '');
    });
  }

  // yargs read no option after `--` and said nothing: the proxy served without the allow-list given after it. Its dot
  // notation made `--mtls_allow_cn.x alice` an allow-list of the CN "[object Object]", its negation one of the CN "false".
  test('an option after --, with a dotted name or negated with --no- exits 2 before listening, instead of serving without it', async () => {
    const cases: [string[], string][] = [
      [['--', '--mtls_allow_cn', 'alice'], "'--' ends the options, and nothing after it would be read ('--mtls_allow_cn' 'alice'): remove it"],
      [['--mtls_allow_cn.x', 'alice'], 'unknown option --mtls_allow_cn.x (did you mean --mtls_allow_cn?) (see `ovms-mtls proxy --help`)'],
      [['--no-mtls_allow_cn'], 'unknown option --no-mtls_allow_cn (see `ovms-mtls proxy --help`)'],
      [['--no-mtls_access_log'], 'unknown option --no-mtls_access_log (did you mean --mtls_access_log=false?) (see `ovms-mtls proxy --help`)'],
    ];
    for (const [args, message] of cases) {
      const res = await startupOutcome(['--mtls_workers', '1', ...args]);
      assert.equal(res.listened, false, `${args.join(' ')} started the proxy`);
      assert.equal(res.code, 2);
      assert.equal(res.stderr, `ovms-mtls: ${message}\n`);
    }
  });

  // It started, and every call went to its own TLS port in plain HTTP: 502 / UNAVAILABLE, and a failed handshake of its own logged for each.
  test('an upstream that is the proxy\'s own public port exits 2 before listening, and check says so too', async () => {
    const [port] = (await freeLoopbackPorts(1)) as [number];
    const loop = ['--port', String(port), '--grpc_bind_address', '127.0.0.1', '--mtls_grpc_upstream', `127.0.0.1:${port}`];
    const message = `ovms-mtls: --mtls_grpc_upstream 127.0.0.1:${port} is this proxy's own --port: it would forward every call to itself (give the model server's host:port)\n`;
    const res = await startupOutcome(['--mtls_workers', '1', ...loop]);
    assert.equal(res.listened, false, 'the proxy started');
    assert.equal(res.code, 2);
    assert.equal(res.stderr, message);
    const check = await runCli(['check', ...tlsFlags(), ...loop]);
    assert.equal(check.code, 2);
    assert.equal(check.stderr, message);
    // Through a wildcard bind, a loopback name reaches the REST port as well.
    const [restPort] = (await freeLoopbackPorts(1)) as [number];
    const viaWildcard = await runCli(['check', ...tlsFlags(), '--rest_port', String(restPort), '--rest_bind_address', '::', '--mtls_rest_upstream', `[::1]:${restPort}`]);
    assert.equal(viaWildcard.stderr, `ovms-mtls: --mtls_rest_upstream [::1]:${restPort} is this proxy's own --rest_port: it would forward every call to itself (give the model server's host:port)\n`);
  });

  // secp256k1 and P-192 keys loaded, check said OK, the proxy started, and every handshake failed (no_suitable_signature_algorithm).
  // Node 24 refused the P-192 key by OpenSSL's security level instead, as too small for RSA 2048 (one line on every Node now).
  test('a server key on a curve no TLS client verifies a server by exits 2 before listening, and check fails it', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'ovms-mtls-curve-'));
    try {
      for (const curve of ['secp256k1', 'prime192v1']) {
        const [cert, key] = [join(dir, `${curve}.pem`), join(dir, `${curve}.key`)];
        assert.equal((await runCommand('openssl', ['ecparam', '-name', curve, '-genkey', '-noout', '-out', key])).code, 0);
        const made = await runCommand('openssl', ['req', '-x509', '-key', key, '-out', cert, '-subj', '/CN=localhost', '-days', '2',
          '-addext', 'basicConstraints=critical,CA:FALSE', '-addext', 'subjectAltName=DNS:localhost', '-addext', 'extendedKeyUsage=serverAuth']);
        assert.equal(made.code, 0, made.stderr);
        const message = `--mtls_cert: ${cert} holds an EC key on curve ${curve}, with which no TLS client lets a server sign (TLS 1.3 takes P-256, P-384 and P-521; curl, Go and Java offer no other): every handshake would fail; reissue it with a P-256 key (the default of \`ovms-mtls certs init\`) or RSA 2048`;
        const res = await startupOutcome(['--mtls_workers', '1', '--mtls_cert', cert, '--mtls_key', key]);
        assert.equal(res.listened, false, `${curve}: the proxy started`);
        assert.equal(res.code, 2);
        assert.equal(res.stderr, `ovms-mtls: ${message}\n`);
        const check = await runCli(['check', ...tlsFlags(), '--mtls_cert', cert, '--mtls_key', key]);
        assert.equal(check.code, 1);
        assert.match(check.stdout, new RegExp(`^FAIL  ${message.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`, 'm'));
      }
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  // OVMS_MTLS_ALOW_CN=alice was passed over without a word, and the proxy admitted every client the CA vouches for.
  test('an OVMS_MTLS_* variable that names no option exits 2 before listening, naming the variable meant', async () => {
    const res = await startupOutcome(['--mtls_workers', '1'], { OVMS_MTLS_ALOW_CN: 'alice' });
    assert.equal(res.listened, false, 'the proxy started');
    assert.equal(res.code, 2);
    assert.equal(res.stderr, "ovms-mtls: OVMS_MTLS_ALOW_CN is set in the environment but is no option's variable (did you mean OVMS_MTLS_ALLOW_CN, for --mtls_allow_cn?): correct its name, or unset it\n");
  });

  // yargs translated its own messages: under de_DE the first said "Unbekanntes Argument: bogus", the second "Unbekanntes Argument: maybe".
  test('under a non-English locale an unknown option and a stray word get the same lines', async () => {
    const german = { LANG: 'de_DE.UTF-8', LC_ALL: 'de_DE.UTF-8', LANGUAGE: 'de' };
    const unknown = await runCli(['proxy', '--port', '1', '--mtls_grpc_upstream', '127.0.0.1:9', '--mtls_bogus', 'x', ...tlsFlags()], { env: german });
    assert.equal(unknown.stderr, 'ovms-mtls: unknown option --mtls_bogus (see `ovms-mtls proxy --help`)\n');
    const stray = await runCli(['proxy', '--port', '1', '--mtls_grpc_upstream', '127.0.0.1:9', '--mtls_access_log', 'maybe', ...tlsFlags()], { env: german });
    assert.match(stray.stderr, /^ovms-mtls: unexpected argument 'maybe'; /);
  });

  // OpenSSL in Node trusts a client chain only up to a self-signed CA of the bundle: this set served and refused every client, saying nothing at start.
  test('an intermediate CA without its root next to a CA in use starts with a warning that names it and says what to add', { timeout: 60_000 }, async () => {
    const [restPort] = (await freeLoopbackPorts(1)) as [number];
    const bundle = join(pki.dir, 'other_root_and_intermediate.pem');
    await writeFile(bundle, pki.otherCa.certPem + pki.intermediateCa.certPem);
    const cli = startCli(['proxy', '--rest_port', String(restPort), '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', '127.0.0.1:9', '--mtls_workers', '1', ...tlsFlags(), '--mtls_client_ca', bundle]);
    try {
      await cli.logs.waitFor((l) => l.event === 'listening');
      const warned = cli.logs.lines.filter((l) => l.event === 'client_ca_unanchored');
      assert.equal(warned.length, 1, JSON.stringify(cli.logs.lines));
      assert.match(String(warned[0]!.msg), /^client CA ovms-mtls test intermediate CA in \S+other_root_and_intermediate\.pem is an intermediate CA without its root \(ovms-mtls test client CA\) in the bundle: .*append the root CA/);
    } finally {
      cli.child.kill('SIGTERM');
      assert.equal(await cli.exited, 0);
    }
  });

  // Alone, the same intermediate started, refused every client, and only /readyz (503) said so; a bundle of expired CAs was already refused at start.
  test('a client CA bundle in which no CA can admit a client is refused at start with one line naming why', async () => {
    const [restPort] = (await freeLoopbackPorts(1)) as [number];
    const alone = await runCli(['proxy', '--rest_port', String(restPort), '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', '127.0.0.1:9', '--mtls_workers', '1', ...tlsFlags(), '--mtls_client_ca', pki.paths['intermediate_ca.pem']!]);
    assert.equal(alone.code, 2, alone.stdout + alone.stderr);
    assert.match(alone.stderr, /--mtls_client_ca: \S+intermediate_ca\.pem: no CA of the bundle can admit a client, so every client would be refused: client CA ovms-mtls test intermediate CA leads to no root CA of the bundle \(its clients are refused as unknown_ca; append its root, ovms-mtls test client CA\)/);
    assert.doesNotMatch(alone.stderr, /\n\s+at /);
  });

  // OpenSSL's security level refuses every client of a SHA-1-signed CA as UNSPECIFIED: this set served, and `check` and the start said nothing.
  test('a client CA signed with SHA-1 in --mtls_client_ca starts with a warning that names it and says what to reissue', { timeout: 60_000 }, async () => {
    const ext = join(pki.dir, 'ca-ext.cnf');
    await writeFile(ext, 'basicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n');
    const [csr, sha1Ca, bundle] = ['sha1_ca.csr', 'sha1_ca.pem', 'root_and_sha1_ca.pem'].map((name) => join(pki.dir, name)) as [string, string, string];
    for (const args of [
      ['req', '-new', '-key', pki.paths['intermediate_ca.key']!, '-subj', '/CN=SHA-1 signed CA', '-out', csr],
      ['x509', '-req', '-sha1', '-in', csr, '-CA', pki.paths['client_cert_ca.pem']!, '-CAkey', pki.paths['client_cert_ca.key']!, '-days', '1', '-extfile', ext, '-out', sha1Ca],
    ]) {
      const made = await runCommand('openssl', args);
      assert.equal(made.code, 0, made.stderr);
    }
    await writeFile(bundle, pki.clientCa.certPem + readFileSync(sha1Ca, 'utf8'));
    const warned = await warningsAtStart(bundle, 'client_ca_weak');
    assert.match(String(warned.msg), /^client CA SHA-1 signed CA in \S+root_and_sha1_ca\.pem is signed with SHA-1, which OpenSSL refuses at its security level: every client whose chain runs through it is refused \(verify_failed\); reissue it signed with SHA-256$/);
  });

  test('a client CA bundle whose names are over 32 KiB starts with a warning that Java clients refuse the request for a client certificate', { timeout: 60_000 }, async () => {
    const bundle = join(pki.dir, 'many_cas.pem');
    await writeFile(bundle, await casWithNamesOf(JAVA_CA_NAMES_LIMIT + 1, pki.clientCa));
    const warned = await warningsAtStart(bundle, 'client_ca_names_large');
    assert.match(String(warned.msg), /^client CA bundle \S+many_cas\.pem: the names of its \d+ CAs take 32701 bytes .*Java clients refuse a request over 32 KiB/);
  });

  // Relay gives each client its own upstream connection: the count was taken and did nothing.
  test('a client certificate the proxy\'s own judgement fails on is refused as internal_error with the error logged, and the proxy serves on', { timeout: 60_000 }, async () => {
    const defective = await issueClientCert({ issuer: pki.clientCa, commonName: 'judgement-defect' });
    const { cli, restPort } = await startProxyCli(tlsFlags(), { NODE_OPTIONS: `--import=${JUDGEMENT_DEFECT}`, DEFECT_CN: 'judgement-defect' });
    try {
      const refused = await https1(restPort, pki, { path: '/v2/health/ready', client: defective });
      assert.equal(refused.status, 403);
      assert.match(refused.body, /client certificate refused \(internal_error\): the proxy failed to judge/);
      assert.doesNotMatch(refused.body, /stand-in defect|at /, 'the error stays in our log');
      const line = await cli.logs.waitFor((l) => l.event === 'client_refused' && l['reason'] === 'internal_error');
      assert.equal(line.level, 'error');
      assert.match(String(line['error']), /TypeError: a stand-in defect in judging this certificate\n\s+at /);
      assert.equal(line['subject'], undefined);
      const served = await https1(restPort, pki, { path: '/v2/health/ready' });
      assert.equal(served.status, 200);
      assert.equal(cli.child.exitCode, null);
    } finally {
      cli.child.kill('SIGTERM');
      await cli.exited;
    }
  });

  test('an upstream connection count in gRPC relay mode exits 2 before listening, instead of being taken and doing nothing', async () => {
    const res = await startupOutcome(['--mtls_grpc_mode', 'relay', '--mtls_grpc_upstream_connections', '4']);
    assert.equal(res.listened, false, 'the proxy started');
    assert.equal(res.code, 2);
    assert.match(res.stderr, /^ovms-mtls: --mtls_grpc_upstream_connections applies to --mtls_grpc_mode terminate only: in relay mode each client gets its own connection to the model server/);
    assert.equal(res.stderr.trim().split('\n').length, 1, res.stderr);
  });

  test('an allow option given without a value exits 2 before listening, instead of admitting every client', async () => {
    for (const args of [['--mtls_allow_cn', '--mtls_workers', '1'], ['--mtls_allow_uri='], ['--mtls_allow_fingerprint', ',']]) {
      const res = await startupOutcome(args);
      assert.equal(res.listened, false, `${args.join(' ')} started the proxy`);
      assert.equal(res.code, 2);
      assert.match(res.stderr, /^ovms-mtls: --mtls_allow_\w+ was given without a value; an empty allow-list would admit every client/);
      assert.equal(res.stderr.trim().split('\n').length, 1, res.stderr);
    }
  });

  // An empty variable was taken for unset: OVMS_MTLS_ALLOW_CN= (a compose `${CN}` of nothing) admitted every
  // client the CA vouches for, and OVMS_MTLS_CRL= served revoked clients, where `--mtls_allow_cn=` and `--mtls_crl=` are refused.
  test('an allow-list or CRL variable set to nothing exits 2 before listening, naming the variable; a command-line value wins over it', async () => {
    for (const [variable, risk] of [['OVMS_MTLS_ALLOW_CN', 'an empty allow-list would admit every client the CA vouches for'], ['OVMS_MTLS_ALLOW_FINGERPRINT', 'an empty allow-list'], ['OVMS_MTLS_CRL', 'read as unset, it could leave revocation unchecked']] as const) {
      const res = await startupOutcome(['--mtls_workers', '1'], { [variable]: '' });
      assert.equal(res.listened, false, `${variable}= started the proxy`);
      assert.equal(res.code, 2);
      assert.ok(res.stderr.startsWith(`ovms-mtls: ${variable} is set but empty: ${risk}`), res.stderr);
      assert.equal(res.stderr.trim().split('\n').length, 1, res.stderr);
    }
    const overridden = await startupOutcome(['--mtls_workers', '1', '--mtls_allow_cn', 'client'], { OVMS_MTLS_ALLOW_CN: '' });
    assert.equal(overridden.listened, true, overridden.stderr);
  });

  // The CRL went unloaded without a word, and a revoked client was served.
  test('--mtls_crl given without a value (an unset shell variable) exits 2 before listening, instead of serving without revocation checks', async () => {
    const res = await startupOutcome(['--mtls_crl', '--mtls_workers', '1']);
    assert.equal(res.listened, false, 'the proxy started');
    assert.equal(res.code, 2);
    assert.equal(res.stderr, 'ovms-mtls: --mtls_crl needs a value (--mtls_crl VALUE or --mtls_crl=VALUE)\n');
  });

  test('a duration or number option given without a value exits 2 before listening, instead of a 0 s timeout or the default', async () => {
    const cases: [string[], RegExp][] = [
      [['--mtls_handshake_timeout', '--mtls_workers', '1'], /^ovms-mtls: --mtls_handshake_timeout: '' is not a number of seconds >= 0/],
      [['--mtls_idle_timeout='], /^ovms-mtls: --mtls_idle_timeout: '' is not a number of seconds >= 0/],
      [['--mtls_max_connections', '--mtls_workers', '1'], /^ovms-mtls: --mtls_max_connections: '' is not a whole number between 0 and/],
    ];
    for (const [args, message] of cases) {
      const res = await startupOutcome(args);
      assert.equal(res.listened, false, `${args.join(' ')} started the proxy`);
      assert.equal(res.code, 2);
      assert.match(res.stderr, message);
    }
  });

  test('a duration too long for a Node timer exits 2 before listening, instead of becoming a 1 ms timeout', async () => {
    const res = await startupOutcome(['--mtls_idle_timeout', '9999999', '--mtls_workers', '1']);
    assert.equal(res.listened, false, 'the proxy started');
    assert.equal(res.code, 2);
    assert.match(res.stderr, /^ovms-mtls: --mtls_idle_timeout: '9999999' is more than 2000000 seconds \(23 days\), the longest timeout supported\n$/);
  });

  test('a timeout of 0, which cannot mean off, exits 2 before listening instead of a proxy that times out every client at once', async () => {
    const cases: [string[], string][] = [
      [['--mtls_handshake_timeout', '0'], `--mtls_handshake_timeout: '0' would time out at once, and this timeout cannot be turned off: give a number of seconds above 0 (default 10)`],
      [['--mtls_idle_timeout=0'], `--mtls_idle_timeout: '0' would time out at once, and this timeout cannot be turned off: give a number of seconds above 0 (default 65)`],
      [['--mtls_upstream_connect_timeout', '0.0001'], `--mtls_upstream_connect_timeout: '0.0001' would time out at once, and this timeout cannot be turned off: give a number of seconds above 0 (default 10)`],
    ];
    for (const [args, message] of cases) {
      const res = await startupOutcome([...args, '--mtls_workers', '1']);
      assert.equal(res.listened, false, `${args.join(' ')} started the proxy`);
      assert.equal(res.code, 2);
      assert.equal(res.stderr, `ovms-mtls: ${message}\n`);
    }
  });

  test('the same port for gRPC and REST exits 2 saying so, not that another process uses the port', async () => {
    const [port] = (await freeLoopbackPorts(1)) as [number];
    const res = await runCli(['proxy', '--port', String(port), '--grpc_bind_address', '127.0.0.1', '--mtls_grpc_upstream', '127.0.0.1:9',
      '--rest_port', String(port), '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', '127.0.0.1:9', ...tlsFlags()]);
    assert.equal(res.code, 2);
    assert.equal(res.stderr, `ovms-mtls: --port and --rest_port are both ${port}: gRPC and REST need a port each, as for OVMS\n`);
  });

  test('the admin port on a public port\'s address exits 2 saying so, not that another process uses the port', async () => {
    const [port] = (await freeLoopbackPorts(1)) as [number];
    const res = await runCli(['proxy', '--rest_port', String(port), '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', '127.0.0.1:9',
      '--mtls_admin_port', String(port), ...tlsFlags()]);
    assert.equal(res.code, 2);
    assert.equal(res.stderr, `ovms-mtls: --mtls_admin_port and --rest_port are both ${port} on the same address: the admin listener needs a port of its own\n`);
  });

  test('--mtls_user, which only the entrypoint acts on, exits 2 before listening instead of leaving the proxy as root', async () => {
    const res = await startupOutcome(['--mtls_user', 'nobody', '--mtls_workers', '1']);
    assert.equal(res.listened, false, 'the proxy started');
    assert.equal(res.code, 2);
    assert.match(res.stderr, /^ovms-mtls: --mtls_user applies to the OVMS entrypoint only: start `ovms-mtls proxy` as the user it should run as .*\n$/);
  });

  test('an entrypoint-only variable in the environment (a shared env file) is named in a warning, OVMS_MTLS_USER with the user the proxy stays', async () => {
    const { cli } = await startProxyCli(tlsFlags(), { OVMS_MTLS_USER: 'nobody', OVMS_MTLS_RESTART: 'on-failure' });
    try {
      const ignored = cli.logs.lines.filter((l) => l.event === 'variable_ignored');
      assert.deepEqual(ignored.map((l) => [l.level, l['variable']]), [['warn', 'OVMS_MTLS_RESTART'], ['warn', 'OVMS_MTLS_USER']]);
      assert.match(String(ignored[1]!.msg), /^OVMS_MTLS_USER applies to the OVMS entrypoint only: `ovms-mtls proxy` ignores it; it runs as the user that started it \(uid \d+\)$/);
    } finally {
      cli.child.kill('SIGTERM');
      assert.equal(await cli.exited, 0);
    }
  });

  test('an upstream given for a protocol with no public port (an env file shared by deployments) is named in a warning: nothing listens for it', async () => {
    const [restPort] = (await freeLoopbackPorts(1)) as [number];
    const cli = startCli(['proxy', '--rest_port', String(restPort), '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', `127.0.0.1:${upstream.restPort}`, ...tlsFlags()],
      { env: { OVMS_MTLS_GRPC_UPSTREAM: `127.0.0.1:${upstream.grpcPort}` } });
    try {
      await cli.logs.waitFor((l) => l.event === 'listening' && l['listener'] === 'rest');
      const ignored = cli.logs.lines.filter((l) => l.event === 'option_ignored');
      assert.deepEqual(ignored.map((l) => [l.level, l['option'], l.msg]), [
        ['warn', 'mtls_grpc_upstream', '--mtls_grpc_upstream is set, but --port is not: nothing listens for it, so it is not used (give --port to serve it)'],
      ]);
      assert.equal(cli.logs.lines.some((l) => l.event === 'listening' && l['listener'] === 'grpc'), false);
    } finally {
      cli.child.kill('SIGTERM');
      assert.equal(await cli.exited, 0, cli.stderr());
    }
  });

  test('a public port already in use exits 2 naming the port, and nothing keeps listening', async () => {
    const blocker = createServer().listen(0, '127.0.0.1');
    await once(blocker, 'listening');
    const busy = (blocker.address() as { port: number }).port;
    const [free] = (await freeLoopbackPorts(1)) as [number];
    try {
      const res = await runCli(['proxy', '--rest_port', String(free), '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', '127.0.0.1:9',
        '--port', String(busy), '--grpc_bind_address', '127.0.0.1', '--mtls_grpc_upstream', '127.0.0.1:9', ...tlsFlags()]);
      assert.equal(res.code, 2);
      assert.match(res.stderr, new RegExp(`^ovms-mtls: --port ${busy}: cannot listen on 127\\.0\\.0\\.1:${busy}: the port is already in use`));
    } finally {
      blocker.close();
    }
  });

  test('options come from OVMS_MTLS_* variables and --opt=value spellings', async () => {
    const { cli, grpcPort } = await startProxyCli([], {
      OVMS_MTLS_CERT: pki.paths['server.pem']!, OVMS_MTLS_KEY: pki.paths['server.key']!, OVMS_MTLS_CLIENT_CA: pki.paths['client_cert_ca.pem']!,
    });
    const clients = grpcClients(`localhost:${grpcPort}`, pki);
    try {
      assert.equal((await unary(clients.kserve, 'ServerLive', {})).response.live, true);
    } finally {
      clients.close();
      cli.child.kill('SIGTERM');
      assert.equal(await cli.exited, 0);
    }
  });
  /** The status line of GET /v2/health/live sent to `host`. */
  async function liveOver(host: string, port: number): Promise<string> {
    const socket = tlsConnect({ host, port, ALPNProtocols: ['http/1.1'], ...tlsClientOptions(pki) });
    await once(socket, 'secureConnect');
    socket.write('GET /v2/health/live HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n');
    let text = '';
    for await (const chunk of socket) text += String(chunk);
    return text.slice(0, text.indexOf('\r\n'));
  }

  test('--rest_bind_address 127.0.0.1,:: serves on both (:: bound IPv6-only, as nginx binds [::]), with 2 workers; a repeated address is bound once', async () => {
    const { cli, restPort } = await startProxyCli(['--rest_bind_address', '127.0.0.1,::,127.0.0.1', '--mtls_workers', '2', ...tlsFlags()]);
    try {
      assert.equal(await liveOver('127.0.0.1', restPort), 'HTTP/1.1 200 OK');
      assert.equal(await liveOver('::1', restPort), 'HTTP/1.1 200 OK');
    } finally {
      cli.child.kill('SIGTERM');
      assert.equal(await cli.exited, 0);
    }
  });

  test('SIGUSR1 to the primary or a worker is logged and ignored: no Node.js inspector opens on 127.0.0.1:9229', { timeout: 60_000 }, async () => {
    const { cli } = await startProxyCli(['--mtls_workers', '2', ...tlsFlags()]);
    try {
      const restListening = () => cli.logs.lines.filter((l) => l.event === 'listening' && l['listener'] === 'rest');
      await eventually(() => restListening().length >= 2, 'both workers listening');
      const pid = cli.child.pid!;
      const workers = readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).map(Number);
      assert.equal(workers.length, 2);
      for (const target of [pid, ...workers]) process.kill(target, 'SIGUSR1');
      const ignored = () => cli.logs.lines.filter((l) => l.event === 'signal_ignored' && l['signal'] === 'SIGUSR1');
      await eventually(() => ignored().length === 3, 'three signal_ignored lines');
      assert.deepEqual(ignored().map((l) => l['pid'] ?? pid).sort(), [pid, ...workers].sort());
    } finally {
      cli.child.kill('SIGTERM');
      assert.equal(await cli.exited, 0);
    }
    assert.doesNotMatch(cli.stderr(), /Debugger listening/);
  });

  // SIGUSR1 opened the inspector and SIGHUP (a `systemctl reload` right after start) ended the process, by its default action.
  for (const signal of ['SIGUSR1', 'SIGHUP'] as const) {
    test(`${signal} while the proxy is still starting (reading its key) neither opens the inspector nor ends it: the start goes on`, { timeout: 60_000 }, async () => {
      // test/fixtures/hold-open holds the proxy inside its key read until this test lets it go: a start-up that lasts as long as it must, no timing.
      const dir = await mkdtemp(join(tmpdir(), 'ovms-mtls-hold-'));
      const key = join(dir, 'server.key');
      await writeFile(key, readFileSync(pki.paths['server.key']!));
      const [restPort] = (await freeLoopbackPorts(1)) as [number];
      const cli = startCli(['proxy', '--rest_port', String(restPort), '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', `127.0.0.1:${upstream.restPort}`,
        '--mtls_cert', pki.paths['server.pem']!, '--mtls_key', key, '--mtls_client_ca', pki.paths['client_cert_ca.pem']!, '--mtls_workers', '1'],
      { env: { NODE_OPTIONS: `--import=${HOLD_OPEN}`, HOLD_OPEN_PATH: key } });
      const exitedEarly = once(cli.child, 'exit').then(([code, by]) => Promise.reject(new Error(`the proxy exited (${code ?? by}): ${cli.stderr()}`)));
      exitedEarly.catch(() => {});
      try {
        await Promise.race([eventually(() => existsSync(`${key}.held`), 'the proxy held in its key read'), exitedEarly]);
        process.kill(cli.child.pid!, signal);
        await writeFile(`${key}.go`, '');
        await Promise.race([cli.logs.waitFor((l) => l.event === 'listening'), exitedEarly]);
      } finally {
        cli.child.kill('SIGTERM');
        await cli.exited;
        await rm(dir, { recursive: true, force: true });
      }
      assert.doesNotMatch(cli.stderr(), /Debugger listening/);
    });
  }

  test('0.0.0.0 with an IPv4 address it covers is refused with the configuration, not blamed on another process', async () => {
    const res = await runCli(['proxy', '--rest_port', '18443', '--rest_bind_address', '0.0.0.0,127.0.0.1', '--mtls_rest_upstream', '127.0.0.1:9', ...tlsFlags()]);
    assert.equal(res.code, 2);
    assert.equal(res.stderr, 'ovms-mtls: --rest_bind_address: 0.0.0.0 already covers 127.0.0.1 (list one or the other)\n');
  });

  test('a bad value from an OVMS_MTLS_* variable is reported naming the variable; from the command line, naming only the option', async () => {
    const proxy = (extra: string[]) => ['proxy', '--rest_port', '18443', '--rest_bind_address', '127.0.0.1', '--mtls_rest_upstream', '127.0.0.1:9', ...tlsFlags(), ...extra];
    const fromEnv = await runCli(proxy([]), { env: { OVMS_MTLS_WORKERS: 'abc' } });
    assert.equal(fromEnv.code, 2);
    assert.match(fromEnv.stderr, /^ovms-mtls: --mtls_workers: 'abc' .* \(set by OVMS_MTLS_WORKERS in the environment\)\n$/);
    const fromArgv = await runCli(proxy(['--mtls_workers=abc']), { env: { OVMS_MTLS_WORKERS: '1' } });
    assert.equal(fromArgv.code, 2);
    assert.match(fromArgv.stderr, /^ovms-mtls: --mtls_workers: 'abc' /);
    assert.doesNotMatch(fromArgv.stderr, /OVMS_MTLS_WORKERS/);
    const missingFile = await runCli(['proxy', '--rest_port', '18443', '--mtls_rest_upstream', '127.0.0.1:9'], { env: { OVMS_MTLS_CERT: '/nonexistent/server.pem', OVMS_MTLS_KEY: '/nonexistent/server.key', OVMS_MTLS_CLIENT_CA: '/nonexistent/ca.pem' } });
    assert.equal(missingFile.code, 2);
    assert.match(missingFile.stderr, /^ovms-mtls: --mtls_\w+: \/nonexistent\/.* \(set by OVMS_MTLS_\w+ in the environment\)\n$/);
  });
});

describe('--mtls_min_tls_version from the command line', () => {
  test('TLSv1.3 (nginx\'s spelling) with 2 workers refuses a TLS 1.2 client and serves a TLS 1.3 one; 1.1, 1.0 and other words are refused at start naming the choices', async () => {
    const { cli, restPort } = await startProxyCli([...tlsFlags(), '--mtls_workers=2', '--mtls_min_tls_version=TLSv1.3']);
    try {
      // Each worker in turn takes a connection: a few of each reach both.
      for (let i = 0; i < 4; i += 1) {
        assert.equal(await negotiatedVersion(restPort, pki, 'TLSv1.2'), 'ERR_SSL_TLSV1_ALERT_PROTOCOL_VERSION');
        assert.equal(await negotiatedVersion(restPort, pki, 'TLSv1.3'), 'TLSv1.3');
      }
    } finally {
      cli.child.kill('SIGTERM');
      assert.equal(await cli.exited, 0);
    }
    const choices = 'give 1.2 (TLS 1.2 and 1.3, the default) or 1.3 (TLS 1.3 only)';
    const old = await startupOutcome(['--mtls_min_tls_version=1.1']);
    assert.deepEqual(old, { listened: false, code: 2, stderr: `ovms-mtls: --mtls_min_tls_version: '1.1': TLS 1.0 and 1.1 are never offered (deprecated by RFC 8996); ${choices}\n` });
    const fromEnv = await startupOutcome([], { OVMS_MTLS_MIN_TLS_VERSION: 'tls13' });
    assert.deepEqual(fromEnv, { listened: false, code: 2, stderr: `ovms-mtls: --mtls_min_tls_version: 'tls13': that is no TLS version; ${choices} (set by OVMS_MTLS_MIN_TLS_VERSION in the environment)\n` });
  });
});

describe('proxy gRPC relay mode from the command line', () => {
  test('OVMS_MTLS_GRPC_MODE=relay relays the gRPC port with 2 workers and logs each connection, not each call', async () => {
    const { cli, grpcPort } = await startProxyCli([...tlsFlags(), '--mtls_workers', '2'], { OVMS_MTLS_GRPC_MODE: 'relay' });
    try {
      for (let i = 0; i < 4; i++) {
        const clients = grpcClients(`localhost:${grpcPort}`, pki);
        assert.equal((await unary(clients.echo, 'Unary', { payload: Buffer.from(`c${i}`) })).response.payload.toString(), `c${i}`);
        clients.close();
      }
      const line = await cli.logs.waitFor((l) => l.event === 'relay_access');
      assert.equal(line['subject'], 'CN=client,OU=tests');
      assert.equal(cli.logs.lines.some((l) => l.event === 'access' && l['listener'] === 'grpc'), false);
    } finally {
      cli.child.kill('SIGTERM');
      assert.equal(await cli.exited, 0);
    }
  });
});

describe('proxy graceful shutdown', () => {
  test('SIGTERM stops accepting, lets an SSE response and a gRPC stream in flight finish, then exits 0', async () => {
    board = new GateBoard();
    // One process: the listening socket closes before the `signal` line. With workers it closes
    // once every worker has stopped accepting, a moment later (test/workers.test.ts).
    const { cli, grpcPort, restPort } = await startProxyCli([...tlsFlags(), '--mtls_workers', '1']);
    const clients = grpcClients(`localhost:${grpcPort}`, pki);
    const rest = h2Session(restPort, pki);
    try {
      const bidi = clients.echo.Bidi();
      const replies = bidi[Symbol.asyncIterator]();
      bidi.write({ payload: Buffer.from('before') });
      assert.equal(((await replies.next()).value as EchoReply).payload.toString(), 'before');

      const sse = rest.request({ ':method': 'POST', ':path': '/v3/chat/completions', 'content-type': 'application/json' });
      sse.end(JSON.stringify({ stream: true }));
      const events = sseEvents(sse);
      board.open(0);
      assert.match(String((await events.next()).value), /chat\.completion\.chunk/);

      cli.child.kill('SIGTERM');
      await cli.logs.waitFor((l) => l.event === 'signal');
      const refused = tcpConnect(grpcPort, '127.0.0.1');
      const [err] = (await once(refused, 'error')) as [NodeJS.ErrnoException];
      // RESET when the connection raced into the backlog as the socket closed; a live
      // listener would instead hold a silent connection open until the handshake timeout.
      assert.match(String(err.code), /^(ECONNREFUSED|ECONNRESET)$/);

      bidi.write({ payload: Buffer.from('during drain') });
      assert.equal(((await replies.next()).value as EchoReply).payload.toString(), 'during drain');
      const status = once(bidi, 'status') as Promise<[grpc.StatusObject]>;
      bidi.end();
      assert.equal((await replies.next()).done, true);
      assert.equal((await status)[0].code, grpc.status.OK);

      board.openAll();
      const rest2: string[] = [];
      for await (const e of events) rest2.push(e);
      assert.equal(rest2.length, CHAT_REPLY_WORDS.length);
      assert.equal(rest2.at(-1), 'data: [DONE]');
      assert.equal(await cli.exited, 0);
    } finally {
      clients.close();
      rest.destroy();
      if (cli.child.exitCode === null) cli.child.kill('SIGKILL');
    }
  });
});

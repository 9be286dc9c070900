/**
 * `ovms-mtls demo`: throwaway certificates, the stand-in model server and the
 * proxy on loopback, plus commands to paste. Nothing to install, nothing left
 * behind (unless --dir keeps the certificates).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { isSea } from 'node:sea';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CERT_FILES, certsInit } from '../certs-command.js';
import { assertAbsent, ensureDirectory } from '../certs-command/files.js';
import { DEFAULTS, EMPTY_ALLOW_LIST, parseChoice, parsePort, refuseSharedPublicPort, type Config } from '../config.js';
import { ConfigError } from '../errors.js';
import { createLogger, LOG_LEVELS } from '../log.js';
import { loadTlsMaterialSync } from '../tls-material.js';
import { startProxy } from '../proxy.js';
import { startModelServer, type ModelServer } from '../demo/model-server.js';
import { freeLoopbackPorts } from '../ports.js';
import { protoDir } from '../demo/grpc-client.js';
import type { OptionSpec } from '../options.js';
import { collectOptions, parseCommandLine } from './options-parser.js';
import { waitForStopSignal } from './lifecycle.js';
import type { Io } from './main.js';

const DEMO_OPTIONS: readonly OptionSpec[] = [
  { name: 'port', type: 'number', describe: 'Public gRPC port', defaultDescription: '9443' },
  { name: 'rest_port', type: 'number', describe: 'Public REST port', defaultDescription: '8443' },
  { name: 'dir', type: 'string', describe: 'Keep the demo certificates in this directory (a new or empty one: an existing set is never overwritten)', defaultDescription: 'a temporary directory, removed on exit' },
  { name: 'mtls_log_level', type: 'string', describe: 'Log level of the proxy', defaultDescription: 'warn' },
];

/** Every option of DEMO_OPTIONS, as the README's command-line reference gives it; the top-level --help shows it too. */
export const DEMO_SYNOPSIS = 'ovms-mtls demo [--port 9443] [--rest_port 8443] [--dir DIR] [--mtls_log_level warn]';

const USAGE = `${DEMO_SYNOPSIS}\n\nStarts throwaway certificates + a stand-in model server + the mTLS proxy on 127.0.0.1.`;

function demoConfig(certDir: string, ports: { grpc: number; rest: number }, upstream: { grpc: number; rest: number }, logLevel: Config['logLevel']): Config {
  return {
    grpc: { hosts: ['127.0.0.1'], port: ports.grpc, upstream: { host: '127.0.0.1', port: upstream.grpc } },
    rest: { hosts: ['127.0.0.1'], port: ports.rest, upstream: { host: '127.0.0.1', port: upstream.rest } },
    tls: { cert: join(certDir, 'server.pem'), key: join(certDir, 'server.key'), clientCa: join(certDir, 'client_cert_ca.pem'), crl: join(certDir, 'client_cert_ca.crl') },
    allow: EMPTY_ALLOW_LIST,
    limits: DEFAULTS.limits,
    shutdownTimeoutMs: 2000,
    logLevel,
    accessLog: true,
    admin: undefined,
    workers: 1,
    grpcMode: DEFAULTS.grpcMode,
    grpcUpstreamConnections: DEFAULTS.grpcUpstreamConnections,
    restMode: DEFAULTS.restMode,
  };
}

/**
 * The command that runs this CLI again, as an absolute path: a line pasted into another shell runs
 * wherever that shell is, not in the repository root. From the package: its own bin/ovms-mtls,
 * resolved from the compiled file (dist/src/cli/demo-command.js -> <package>/bin/). The single
 * executable has no bin/ovms-mtls beside it: it is the command itself.
 */
function ownCommand(): string {
  return isSea() ? process.execPath : fileURLToPath(new URL('../../../bin/ovms-mtls', import.meta.url));
}

/**
 * A path as one word of a pasted shell command: as it is when it holds nothing a shell would read
 * otherwise, else in single quotes (a space in --dir, TMPDIR or the checkout's path split it).
 */
function shellWord(text: string): string {
  return /^[\w@%+=:,./-]+$/.test(text) ? text : `'${text.replaceAll("'", "'\\''")}'`;
}

/** The commands printed for the user, with the real paths and ports filled in. `kept`: the certificates outlive the demo (--dir). */
function demoInstructions({ certDir, grpcPort, restPort, kept }: { certDir: string; grpcPort: number; restPort: number; kept: boolean }): string {
  const cli = shellWord(ownCommand());
  const cert = (name: string) => shellWord(join(certDir, name));
  const tls = `--cacert ${cert('server_ca.pem')} --cert ${cert('client.pem')} --key ${cert('client.key')}`;
  const infer = `'{"inputs":[{"name":"b","shape":[1,10],"datatype":"FP32","data":[1,2,3,4,5,6,7,8,9,10]}]}'`;
  return `
ovms-mtls demo is running: mTLS gRPC on 127.0.0.1:${grpcPort}, mTLS REST on 127.0.0.1:${restPort}
in front of a stand-in model server with one model, "dummy" (output a = input b + 1).
${kept ? 'Demo certificates (valid 1 day), kept after exit' : 'Throwaway certificates (valid 1 day), removed on exit'}: ${certDir}

REST inference with the client certificate:
  curl -sS ${tls} -H 'content-type: application/json' -d ${infer} https://localhost:${restPort}/v2/models/dummy/infer

Server-Sent Events, event by event:
  curl -sSN ${tls} -H 'content-type: application/json' -d '{"model":"dummy","stream":true,"messages":[]}' https://localhost:${restPort}/v3/chat/completions

Refused without a client certificate (answered 403 with the reason the proxy logs):
  curl -sS --cacert ${cert('server_ca.pem')} https://localhost:${restPort}/v2/health/ready

gRPC (KServe ServerLive/ServerReady/ModelMetadata) like a client would:
  ${cli} probe --host localhost --port ${grpcPort} --rest_port ${restPort} --mtls_cert ${cert('client.pem')} --mtls_key ${cert('client.key')} --mtls_ca ${cert('server_ca.pem')} --model dummy

gRPC with grpcurl, if you have it:
  grpcurl -cacert ${cert('server_ca.pem')} -cert ${cert('client.pem')} -key ${cert('client.key')} -import-path ${shellWord(protoDir())} -proto kserve_v2.proto localhost:${grpcPort} inference.GRPCInferenceService/ServerReady

Press Ctrl-C to stop.
`;
}

/**
 * --dir is made as `certs init` makes it, before the demo looks inside: a --dir that is a file is then
 * refused in the same words, not as ENOTDIR on the first file of the set looked for in it.
 */
async function prepareKeptDirectory(dir: string): Promise<void> {
  await ensureDirectory(dir);
  await assertNoCertificateSet(dir);
}

/** A --dir that already holds certificates may hold CA keys in use: the demo never overwrites them. */
async function assertNoCertificateSet(dir: string): Promise<void> {
  try {
    await assertAbsent(dir, Object.values(CERT_FILES));
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    throw new ConfigError(`demo --dir: ${err.message.replace(/; pass --force to overwrite$/, '')}; the demo writes a new set and keeps no existing one: give a new or empty --dir`);
  }
}

/**
 * Free ports for the stand-in model server, other than the demo's own: those are bound after it,
 * and one that is free until then (a port in the ephemeral range) could otherwise be the one
 * the system gave the model server, and the demo stopped, saying another process used its port.
 */
async function modelServerPorts(grpcPort: number, restPort: number): Promise<{ grpcPort: number; restPort: number }> {
  const [grpc, rest] = (await freeLoopbackPorts(2, '127.0.0.1', new Set([grpcPort, restPort]))) as [number, number];
  return { grpcPort: grpc, restPort: rest };
}

/** Where the certificates go without --dir; a temporary directory that cannot be made (no writable /tmp) is the user's to fix. */
async function throwawayDirectory(): Promise<string> {
  try {
    return await mkdtemp(join(tmpdir(), 'ovms-mtls-demo-'));
  } catch (err) {
    const why = (err as NodeJS.ErrnoException).code ?? String(err);
    throw new ConfigError(`demo: cannot create a directory for its throwaway certificates in ${tmpdir()}: ${why}; mount a writable /tmp or set TMPDIR to a writable directory`);
  }
}

export async function runDemoCommand(argv: readonly string[], io: Io): Promise<number> {
  // As in every command, a repeated option keeps its last value and one given with nothing is refused:
  // read raw, `--dir a --dir b` (a list) served from a temporary directory removed on exit, and
  // `--dir=` wrote the set, CA keys included, into the current directory. No OVMS_MTLS_* here: the demo takes none.
  const parsed = collectOptions(await parseCommandLine(argv, DEMO_OPTIONS, USAGE, 'demo'), DEMO_OPTIONS, {});
  const grpcPort = parsed['port'] === undefined ? 9443 : parsePort('port', parsed['port']);
  const restPort = parsed['rest_port'] === undefined ? 8443 : parsePort('rest_port', parsed['rest_port']);
  refuseSharedPublicPort(grpcPort, restPort);
  // Checked before the temporary directory exists: a bad value would otherwise leave it behind.
  const logLevel = parseChoice(parsed, 'mtls_log_level', LOG_LEVELS, 'warn');
  const keep = typeof parsed['dir'] === 'string';
  const certDir = keep ? resolve(String(parsed['dir'])) : await throwawayDirectory();
  const logger = createLogger({ level: logLevel });
  if (keep) await prepareKeptDirectory(certDir);
  let model: ModelServer | undefined;
  // Before the instructions say "Press Ctrl-C": a Ctrl-C right after them would otherwise kill the demo outright, leaving its temporary directory behind.
  const stop = waitForStopSignal(logger);
  // Everything after the temporary directory exists is inside the try: a failure anywhere removes it.
  try {
    await certsInit({ dir: certDir, force: true });
    model = await startModelServer(await modelServerPorts(grpcPort, restPort));
    const config = demoConfig(certDir, { grpc: grpcPort, rest: restPort }, { grpc: model.grpcPort!, rest: model.restPort! }, logLevel);
    const proxy = await startProxy({ config, material: loadTlsMaterialSync(config.tls), logger });
    io.stdout.write(demoInstructions({ certDir, grpcPort: proxy.port('grpc')!, restPort: proxy.port('rest')!, kept: keep }));
    await stop.signal;
    await proxy.shutdown(config.shutdownTimeoutMs);
    return 0;
  } finally {
    stop.dispose();
    await model?.close();
    if (!keep) await rm(certDir, { recursive: true, force: true });
  }
}

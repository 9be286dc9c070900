import { X509Certificate, createPrivateKey } from 'node:crypto';
import { createSecureContext } from 'node:tls';
import { ConfigError } from '../errors.js';
import { MAX_SECONDS, parsePort, plainSeconds } from '../config.js';
import type { OptionSpec } from '../options.js';
import { runProbe, type ProbeOptions, type StepResult } from '../probe.js';
import { parseCommandLine } from './options-parser.js';
import { unbracketed } from '../addresses.js';
import { FileKindError, MAX_TLS_FILE_BYTES, readRegularFileSync } from '../regular-file.js';
import { firstPemCertificate, isEncryptedKey, notPemKey } from '../pem-shapes.js';
import { accessDenial } from '../access-denial.js';

/** Seconds each step may take unless --timeout says otherwise. */
export const DEFAULT_PROBE_TIMEOUT_S = 10;

/**
 * The probe's own options. They are not product options (no OVMS_MTLS_*
 * environment): inside the container OVMS_MTLS_CERT names the SERVER
 * certificate, which must never be picked up as the probe's client cert.
 */
export const PROBE_OPTIONS: readonly OptionSpec[] = [
  { name: 'host', type: 'string', describe: 'Host name or IP of the deployment' },
  { name: 'port', type: 'number', describe: 'Public gRPC (mTLS) port to check' },
  { name: 'rest_port', type: 'number', describe: 'Public REST (mTLS) port to check' },
  { name: 'mtls_cert', type: 'string', describe: 'Client certificate (PEM)' },
  { name: 'mtls_key', type: 'string', describe: 'Client private key (PEM)' },
  { name: 'mtls_ca', type: 'string', describe: 'CA that issued the SERVER certificate (PEM)' },
  { name: 'model', type: 'string', describe: 'Also fetch this model\'s metadata' },
  { name: 'servername', type: 'string', describe: 'Name the server certificate must carry', defaultDescription: '--host' },
  { name: 'timeout', type: 'number', describe: 'Seconds each step may take', defaultDescription: String(DEFAULT_PROBE_TIMEOUT_S) },
  { name: 'proxy_protocol', type: 'string', describe: 'Begin each connection with a PROXY protocol header, v1 or v2, as a load balancer would (a port started with --mtls_proxy_protocol, probed past its load balancer)', defaultDescription: 'none' },
];

export const PROBE_USAGE = `ovms-mtls probe --host HOST [--port P] [--rest_port R] \\
    --mtls_cert client.pem --mtls_key client.key --mtls_ca server_ca.pem [--model NAME]

Checks a running deployment like a client would: TLS handshake with the client
certificate, then KServe ServerLive/ServerReady (and ModelMetadata) over gRPC and
/v2/health/ready (and /v2/models/NAME) over REST. Exit 0 only if every step passes.`;

function readPem(flag: string, value: unknown): Buffer {
  if (typeof value !== 'string' || value === '') throw new ConfigError(`--${flag} is required (a PEM file; \`ovms-mtls certs init\` makes client.pem, client.key and server_ca.pem)`);
  let pem: Buffer;
  try {
    pem = readRegularFileSync(value, MAX_TLS_FILE_BYTES);
  } catch (err) {
    if (err instanceof FileKindError) throw new ConfigError(`--${flag}: ${value} ${err.message} (give the path of the PEM file itself)`);
    const { code } = err as NodeJS.ErrnoException;
    if (code === 'EACCES' || code === 'EPERM') throw new ConfigError(`--${flag}: ${value} ${accessDenial(value)}`);
    throw new ConfigError(`--${flag}: ${value} cannot be read (${code ?? 'error'}; check the path)`);
  }
  return checkPem(flag, value, pem);
}

/**
 * Fails with a one-line message before any connection when a file is not what its flag needs.
 * Node's TLS takes PEM only: a DER CA would be skipped without a word, and the probe would then
 * blame the server certificate for not being trusted.
 */
function checkPem(flag: string, path: string, pem: Buffer): Buffer {
  const problem = flag === 'mtls_key' ? keyProblem(path, pem) : certificateProblem(flag, path, pem);
  if (problem !== undefined) throw new ConfigError(`--${flag}: ${path} ${problem}`);
  return pem;
}

function keyProblem(path: string, pem: Buffer): string | undefined {
  try {
    createPrivateKey(pem);
    return undefined;
  } catch (err) {
    if (isEncryptedKey(pem, err)) return `is encrypted, and probe takes no passphrase (decrypt it: \`openssl pkey -in ${path} -out ${path}.plain\` asks for the passphrase once)`;
    return notPemKey(pem, path);
  }
}

function certificateProblem(flag: string, path: string, pem: Buffer): string | undefined {
  const cert = firstPemCertificate(pem, path, flag);
  return typeof cert === 'string' ? cert : undefined;
}

/**
 * The client files as the TLS connection will load them, checked before any connection:
 * a key of another certificate, or a damaged block after the certificate (a chain file),
 * would otherwise throw from tls.connect as an internal error with a stack trace.
 */
function checkClientPair(certPath: string, cert: Buffer, keyPath: string, key: Buffer): void {
  if (!new X509Certificate(cert).checkPrivateKey(createPrivateKey(key))) {
    throw new ConfigError(`--mtls_key: ${keyPath} does not match --mtls_cert ${certPath} (give the key of that client certificate)`);
  }
  try {
    createSecureContext({ cert, key });
  } catch {
    throw new ConfigError(`--mtls_cert: ${certPath} holds a PEM block after the certificate that is not a valid certificate (a chain file holds the client certificate, then its CAs)`);
  }
}

/**
 * The host as given, without what belongs in other options: a URL or `host:port`, as clients are
 * given the deployment, would be looked up as a host name and reported as one that does not resolve.
 */
function hostOption(given: string): string {
  const url = /^[a-z][a-z0-9+.-]*:\/\/(\[[^\]]*\]|[^/:?#]*)(?::(\d+))?/i.exec(given);
  if (url) throw new ConfigError(`--host takes a host name or address, not a URL: for ${given} give ${hostAdvice(url[1] || 'HOST', url[2])}`);
  const hostPort = /^(\[[^\]]*\]|[^:]+):(\d+)$/.exec(given);
  if (hostPort) throw new ConfigError(`--host takes a host name or address without a port: for ${given} give ${hostAdvice(hostPort[1]!, hostPort[2])}`);
  // `[::1]`, as in the URL a client is given, would be looked up as a host name and "not resolve".
  return unbracketed(given);
}

function hostAdvice(host: string, port: string | undefined): string {
  return port === undefined ? `--host ${host}` : `--host ${host} and --port ${port} (gRPC) or --rest_port ${port} (REST)`;
}

function probeOptions(parsed: Record<string, unknown>): ProbeOptions {
  const last = (v: unknown) => (Array.isArray(v) ? v.at(-1) : v);
  // Spaces around it (a pasted value) are dropped, as around a bind address or an upstream: the name looked up would keep them.
  const hostGiven = last(parsed['host']);
  const given = typeof hostGiven === 'string' ? hostGiven.trim() : '';
  if (given === '') throw new ConfigError('--host is required (the address clients use, e.g. --host localhost)');
  const host = hostOption(given);
  const grpcPort = parsed['port'] === undefined ? undefined : parsePort('port', last(parsed['port']));
  const restPort = parsed['rest_port'] === undefined ? undefined : parsePort('rest_port', last(parsed['rest_port']));
  if (!grpcPort && !restPort) throw new ConfigError('nothing to probe: give --port (gRPC) and/or --rest_port (REST)');
  const timeout = parsed['timeout'] === undefined ? DEFAULT_PROBE_TIMEOUT_S : plainSeconds(last(parsed['timeout']));
  // Past MAX_SECONDS Node fires timers after 1 ms: every step would fail as "no answer within" that long.
  if (Number.isNaN(timeout) || timeout <= 0 || timeout > MAX_SECONDS) {
    throw new ConfigError(`--timeout: '${String(parsed['timeout'])}' is not a number of seconds > 0 and <= ${MAX_SECONDS}`);
  }
  const proxyProtocol = parsed['proxy_protocol'] === undefined ? undefined : proxyProtocolVersion(last(parsed['proxy_protocol']));
  const cert = readPem('mtls_cert', last(parsed['mtls_cert']));
  const key = readPem('mtls_key', last(parsed['mtls_key']));
  checkClientPair(String(last(parsed['mtls_cert'])), cert, String(last(parsed['mtls_key'])), key);
  return {
    host,
    grpcPort: grpcPort || undefined,
    restPort: restPort || undefined,
    servername: last(parsed['servername']) as string | undefined,
    cert,
    key,
    ca: readPem('mtls_ca', last(parsed['mtls_ca'])),
    model: last(parsed['model']) as string | undefined,
    timeoutMs: Math.max(1, Math.round(timeout * 1000)),
    proxyProtocol,
  };
}

function proxyProtocolVersion(given: unknown): 1 | 2 {
  const version = /^v?([12])$/i.exec(String(given).trim())?.[1];
  if (version === undefined) throw new ConfigError(`--proxy_protocol: '${String(given)}' is no PROXY protocol version: give v1 (text, HAProxy send-proxy) or v2 (binary, send-proxy-v2, an AWS NLB)`);
  return version === '1' ? 1 : 2;
}

/** A step's lines. What the server sent (a body, a grpc-message) is in them: printable() each. */
export function formatStep(step: StepResult): string {
  const head = `${step.ok ? 'ok  ' : 'FAIL'}  ${step.listener.padEnd(4)}  ${printable(step.step)}: ${printable(step.detail)}\n`;
  return step.diagnosis ? `${head}      -> ${step.diagnosis.layer} layer: ${printable(step.diagnosis.cause)}\n` : head;
}

// eslint-disable-next-line no-control-regex -- the control characters are what must not reach a terminal
const CONTROL = /[\u0000-\u001f\u007f-\u009f]/g;

/**
 * Control characters (C0, DEL, C1) written as `\u001b`: the text goes to a terminal, where a
 * server's CR, LF or escape sequence would start a line of its own, move the cursor or erase and
 * hide lines (a failed step shown as passed).
 */
function printable(text: string): string {
  return text.replace(CONTROL, (char) => `\\u${char.charCodeAt(0).toString(16).padStart(4, '0')}`);
}

/** `ovms-mtls probe ...`: 0 when every step passed, 1 when one failed. */
export async function runProbeCommand(argv: readonly string[], stdout: NodeJS.WritableStream): Promise<number> {
  const options = probeOptions(await parseCommandLine(argv, PROBE_OPTIONS, PROBE_USAGE, 'probe'));
  let failed = 0;
  let passed = 0;
  const ok = await runProbe(options, (step) => {
    if (step.ok) passed += 1;
    else failed += 1;
    stdout.write(formatStep(step));
  });
  stdout.write(ok ? `probe: all ${passed} steps passed\n` : `probe: ${failed} step(s) failed, ${passed} passed\n`);
  return ok ? 0 : 1;
}

/**
 * HAProxy (Debian's haproxy 2.6) as an L4 load balancer in front of a server: `mode tcp`, one frontend on
 * 127.0.0.1, one backend server line with send-proxy (v1) or send-proxy-v2, its connections made from
 * HAPROXY_SOURCE so the server sees a TCP peer that is not the client the header names.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { connect as netConnect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freeLoopbackPorts } from '../../src/ports.js';
import { exitWithOutput } from './cli.js';
import { eventually } from './ops.js';

/** The address haproxy's connections to the server come from (`source` on the server line); clients use 127.0.0.1. */
export const HAPROXY_SOURCE = '127.0.0.3';

export interface HaproxyOptions {
  /** The backend server: where haproxy forwards each connection, a PROXY header first. */
  server: { host?: string; port: number };
  /** 1: send-proxy (text line), 2: send-proxy-v2 (binary). */
  proxyProtocol: 1 | 2;
  /**
   * Health checks (`check check-send-proxy`) every `intervalMs`: a TCP connect that sends a PROXY header with no
   * client behind it (v2: the LOCAL command) and closes once connected.
   */
  healthChecks?: { intervalMs: number };
  /** The frontend's address; 127.0.0.1 unless given (`::1`: clients' headers name IPv6 addresses). */
  listenHost?: string;
  /** Extensions (TLVs) haproxy adds to a v2 header (`proxy-v2-options`): `crc32c`, `unique-id` (the client's address and port). */
  v2Extensions?: ('crc32c' | 'unique-id')[];
  /** The frontend itself takes only connections that begin with a PROXY header, v1 or v2 (`accept-proxy`), as a second load balancer behind a first. */
  acceptProxy?: boolean;
}

export interface Haproxy {
  /** The frontend's port (on `listenHost`). */
  port: number;
  /** What haproxy wrote so far (its warnings and one log line per connection), for failure messages. */
  output(): string;
  /** What haproxy makes of its server: `UP` or `DOWN`, and its last health check's outcome (`L4OK`...). */
  serverHealth(): Promise<{ status: string; checkStatus: string }>;
  stop(): Promise<void>;
}

const BINARY = ['/usr/sbin/haproxy', ...(process.env['PATH'] ?? '').split(':').map((dir) => join(dir, 'haproxy'))].find((path) => existsSync(path));

function config(options: HaproxyOptions, port: number, adminSocket: string): string {
  const { server, proxyProtocol, healthChecks, listenHost = '127.0.0.1', v2Extensions = [], acceptProxy = false } = options;
  const check = healthChecks ? ` check inter ${healthChecks.intervalMs}ms check-send-proxy` : '';
  const extensions = v2Extensions.length > 0 ? ` proxy-v2-options ${v2Extensions.join(',')}` : '';
  return [
    'global',
    // Its readiness: the socket answers once every listener is bound and the event loop runs.
    `  stats socket ${adminSocket}`,
    // Else haproxy sizes its tables from the file-descriptor limit.
    '  maxconn 256',
    '  log stderr format raw local0 info',
    'defaults',
    '  mode tcp',
    '  log global',
    '  option tcplog',
    '  timeout connect 5s',
    '  timeout client 60s',
    '  timeout server 60s',
    'frontend front',
    `  bind ${listenHost.includes(':') ? `[${listenHost}]` : listenHost}:${port}${acceptProxy ? ' accept-proxy' : ''}`,
    // What the unique-id extension carries.
    ...(v2Extensions.includes('unique-id') ? ['  unique-id-format %ci:%cp'] : []),
    '  default_backend back',
    'backend back',
    `  server model ${server.host ?? '127.0.0.1'}:${server.port} ${proxyProtocol === 2 ? 'send-proxy-v2' : 'send-proxy'} source ${HAPROXY_SOURCE}${check}${extensions}`,
    '',
  ].join('\n');
}

/** haproxy's reply to one command on its admin socket; '' if it cannot be reached. */
function ask(adminSocket: string, command: string): Promise<string> {
  return new Promise((resolve) => {
    const socket = netConnect(adminSocket, () => socket.end(`${command}\n`));
    let reply = '';
    socket.setEncoding('utf8').on('data', (chunk: string) => (reply += chunk));
    socket.on('close', () => resolve(reply));
    socket.on('error', () => resolve(''));
  });
}

/** The backend server's row of `show stat`: its state (`UP`, `DOWN`...) and its last check's (`L4OK`, `L4CON`...). */
async function serverHealth(adminSocket: string): Promise<{ status: string; checkStatus: string }> {
  const [header, ...rows] = (await ask(adminSocket, 'show stat')).replace(/^# /, '').trim().split('\n').map((line) => line.split(','));
  const row = rows.find((fields) => fields[1] === 'model');
  assert.ok(header && row, 'haproxy reports no row for its server');
  const field = (name: string) => row[header.indexOf(name)] ?? '';
  return { status: field('status'), checkStatus: field('check_status') };
}

/** Starts haproxy in the foreground; resolves once it serves its frontend. Nothing is left running if it does not. */
export async function startHaproxy(options: HaproxyOptions): Promise<Haproxy> {
  assert.ok(BINARY, 'haproxy is needed for this test (apt-get install haproxy)');
  const [port] = await freeLoopbackPorts(1, options.listenHost);
  const dir = await mkdtemp(join(tmpdir(), 'ovms-mtls-haproxy-'));
  const adminSocket = join(dir, 'admin.sock');
  const file = join(dir, 'haproxy.cfg');
  await writeFile(file, config(options, port!, adminSocket));
  const child = spawn(BINARY, ['-db', '-f', file], { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  for (const stream of [child.stdout, child.stderr]) stream.setEncoding('utf8').on('data', (chunk: string) => (output += chunk));
  const exited = exitWithOutput(child);
  // A test process that ends without stop() (a timeout, an uncaught error) must not leave haproxy serving.
  const killOnExit = () => child.kill('SIGKILL');
  process.once('exit', killOnExit);
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
    await exited;
    process.removeListener('exit', killOnExit);
    await rm(dir, { recursive: true, force: true });
  };
  const gone = exited.then(({ code, signal }) => {
    throw new Error(`haproxy exited (${signal ?? code}) before serving port ${port}`);
  });
  try {
    await Promise.race([eventually(async () => (await ask(adminSocket, 'show info')).includes('Pid:'), "haproxy's admin socket"), gone]);
  } catch (err) {
    await stop();
    throw new Error(`${(err as Error).message}\n${output}`, { cause: err });
  }
  gone.catch(() => undefined);
  return { port: port!, output: () => output, serverHealth: () => serverHealth(adminSocket), stop };
}

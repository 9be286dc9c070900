/**
 * "Is OVMS up?" for the supervisor, which itself knows nothing about HTTP:
 * the gRPC port accepts a TCP connection, and REST (when on) answers
 * `GET /v2/health/live` with 200. OVMS opens its ports only once the server
 * has started, so this is the earliest moment requests can succeed.
 */
import { readFile } from 'node:fs/promises';
import { request } from 'node:http';
import { connect } from 'node:net';
import type { LoopbackPorts } from './ovms-args.js';
import { listenerOwner, statFields } from './listener-owner.js';
import type { Config } from './config.js';
import { upstreamReadiness } from './health.js';
import type { Liveness } from './ovms-watchdog.js';

/** Per attempt; a healthy loopback peer answers in well under this. */
const PROBE_TIMEOUT_MS = 2000;

function tcpAccepts(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect({ host, port });
    socket.setTimeout(PROBE_TIMEOUT_MS);
    const done = (ok: boolean) => {
      socket.destroy();
      resolve(ok);
    };
    socket.once('connect', () => done(true));
    socket.once('error', () => done(false));
    socket.once('timeout', () => done(false));
  });
}

function restLive(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const req = request({ host, port, path: '/v2/health/live', method: 'GET', agent: false, timeout: PROBE_TIMEOUT_MS }, (res) => {
      res.resume();
      resolve(res.statusCode === 200);
    });
    req.once('error', () => resolve(false));
    req.once('timeout', () => req.destroy());
    req.end();
  });
}

/**
 * Whether the process is stopped (SIGSTOP, SIGTSTP, a debugger): state `T` or `t` in
 * /proc/<pid>/stat, after the command name in parentheses. False where /proc is not there.
 */
export async function processStopped(pid: number): Promise<boolean> {
  try {
    const [state] = statFields(await readFile(`/proc/${pid}/stat`, 'utf8'));
    return state === 'T' || state === 't';
  } catch {
    return false;
  }
}

/**
 * A probe over OVMS's loopback listeners; the ports are read at each call
 * because they can change. A port counts only when the listener on it is
 * OVMS's own (`pid`): a process that took the port first must not pass for OVMS.
 */
export function ovmsReadinessProbe(host: string, ports: () => LoopbackPorts): (pid: number | undefined) => Promise<boolean> {
  const ownedByOvms = async (pid: number | undefined, port: number) => {
    const owner = pid === undefined ? 'unknown' : await listenerOwner(pid, port);
    return owner === 'ours' || owner === 'unknown';
  };
  return async (pid) => {
    const { grpc, rest } = ports();
    const checks: Promise<boolean>[] = [];
    if (grpc !== undefined) checks.push(ownedByOvms(pid, grpc).then((ours) => ours && tcpAccepts(host, grpc)));
    if (rest !== undefined) checks.push(ownedByOvms(pid, rest).then((ours) => ours && restLive(host, rest)));
    return (await Promise.all(checks)).every(Boolean);
  };
}

/**
 * One hang-watchdog check: alive means every OVMS port gave an answer, whatever it says
 * ("not ready" while a model reloads is alive). It is /readyz's own upstream check, so the
 * watchdog acts on exactly what /readyz reports as "does not answer" or "is stopped". The
 * kernel is asked first: a stopped OVMS could only make the network check wait out `timeoutMs`.
 */
export function ovmsLivenessCheck(config: Pick<Config, 'grpc' | 'rest'>, timeoutMs: number): (pid: number) => Promise<Liveness> {
  const ask = upstreamReadiness(config, timeoutMs);
  return async (pid) => {
    if (await processStopped(pid)) return 'stopped';
    return (await ask()).unanswered ? 'silent' : 'answers';
  };
}

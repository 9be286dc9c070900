/**
 * A load-driver process (forked by run.ts; several run side by side). Gets a
 * DriverSpec, opens its connections, warms up, reports 'ready', runs the
 * measured phase on 'go', reports 'done' and exits. Bounded in time and
 * operations; exits on its own when the orchestrator goes away.
 */
import type { DriverMessage, DriverSpec, ParentMessage, ScenarioId } from './protocol.js';
import { runPhase, type PhaseBudget } from './load/phase.js';
import type { LoadFactory } from './load/load.js';
import { grpcBidiLoad, grpcUnaryLoad } from './load/grpc.js';
import { restH1Load, restH2Load } from './load/rest.js';
import { sseLoad } from './load/sse.js';
import { handshakeLoad } from './load/handshake.js';
import { openIdle } from './load/idle.js';

const LOADS: Record<Exclude<ScenarioId, 'idle'>, LoadFactory> = {
  'grpc-unary-1k': grpcUnaryLoad,
  'grpc-unary-2.9m': grpcUnaryLoad,
  'grpc-bidi-1k': grpcBidiLoad,
  'rest-h1-1k': restH1Load,
  'rest-h2-1k': restH2Load,
  sse: sseLoad,
  handshake: handshakeLoad,
};

const GRACE_MS = 10_000;
const PREPARE_TIMEOUT_MS = 20_000;

/** Resolves once the message is written: disconnecting earlier could drop it. */
function send(message: DriverMessage): Promise<void> {
  return new Promise((resolve) => {
    if (!process.send) resolve();
    else process.send(message, undefined, {}, () => resolve());
  });
}

function nextMessage(type: ParentMessage['type']): Promise<ParentMessage> {
  return new Promise((resolve) => {
    const onMessage = (m: ParentMessage) => {
      if (m.type !== type) return;
      process.off('message', onMessage);
      resolve(m);
    };
    process.on('message', onMessage);
  });
}

async function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what} took over ${ms} ms`)), ms)));
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

async function closedLoop(spec: DriverSpec & { scenario: Exclude<ScenarioId, 'idle'> }): Promise<void> {
  const load = LOADS[spec.scenario](spec);
  await withTimeout(load.prepare(), PREPARE_TIMEOUT_MS, 'opening connections');
  const budget = (durationMs: number): PhaseBudget => ({ durationMs, maxOps: spec.maxOps, graceMs: GRACE_MS });
  const warmup = await runPhase(load.slots, budget(spec.warmupMs), load.loop);
  const go = nextMessage('go');
  await send({ type: 'ready', warmup });
  await go;
  const result = await runPhase(load.slots, budget(spec.durationMs), load.loop);
  load.close();
  await send({ type: 'done', result });
}

async function idle(spec: DriverSpec): Promise<void> {
  const started = performance.now();
  const held = await openIdle(spec);
  const release = nextMessage('release');
  await send({ type: 'holding', opened: held.sessions.length, failed: held.failed, errorSamples: held.errorSamples, elapsedMs: performance.now() - started });
  await release;
  // Still open when released? A server that dropped idle connections is a failure here.
  const alive = held.sessions.filter((s) => !s.closed && !s.destroyed).length;
  const dropped = held.sessions.length - alive;
  const errorSamples = { ...held.errorSamples, ...(dropped > 0 ? { 'closed while idle': dropped } : {}) };
  for (const s of held.sessions) s.destroy();
  await send({ type: 'done', result: { ops: alive, errors: held.failed + dropped, elapsedMs: performance.now() - started, histogram: [], errorSamples } });
}

async function main(): Promise<void> {
  // Exit with the orchestrator: no orphaned load ever keeps running.
  process.on('disconnect', () => process.exit(0));
  const start = (await nextMessage('start')) as Extract<ParentMessage, { type: 'start' }>;
  const spec = start.spec;
  if (spec.scenario === 'idle') await idle(spec);
  else await closedLoop(spec as DriverSpec & { scenario: Exclude<ScenarioId, 'idle'> });
  process.disconnect();
}

main().catch(async (err: unknown) => {
  process.exitCode = 1;
  await send({ type: 'failed', message: (err as Error).message });
  process.disconnect?.();
});

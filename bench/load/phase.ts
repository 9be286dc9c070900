/**
 * One measured phase of a load driver: `slots` loops run concurrently, each
 * repeating an operation until the phase's time or operation budget is spent.
 * A phase always ends: operations still in flight at the hard deadline
 * (budget + grace) are counted as errors ('timeout') and abandoned.
 */
import { Histogram } from '../histogram.js';
import type { PhaseResult } from '../protocol.js';

export interface PhaseBudget {
  readonly durationMs: number;
  readonly maxOps: number;
  /** Extra time for in-flight operations after the budget is spent. */
  readonly graceMs: number;
}

/** What a slot loop uses to report. */
export interface Recorder {
  /** True while the slot should start another operation. */
  more(): boolean;
  ok(latencyUs: number): void;
  fail(reason: string): void;
}

export type SlotLoop = (slot: number, recorder: Recorder) => Promise<void>;

const MAX_ERROR_KINDS = 8;

export async function runPhase(slots: number, budget: PhaseBudget, loop: SlotLoop): Promise<PhaseResult> {
  const started = performance.now();
  const deadline = started + budget.durationMs;
  const histogram = new Histogram();
  const errorSamples: Record<string, number> = {};
  let ops = 0;
  let errors = 0;
  let closed = false;
  const recorder: Recorder = {
    more: () => !closed && ops + errors < budget.maxOps && performance.now() < deadline,
    ok(latencyUs) {
      if (closed) return;
      ops += 1;
      histogram.record(latencyUs);
    },
    fail(reason) {
      if (closed) return;
      errors += 1;
      if (reason in errorSamples || Object.keys(errorSamples).length < MAX_ERROR_KINDS) errorSamples[reason] = (errorSamples[reason] ?? 0) + 1;
    },
  };
  let pending = slots;
  let timer: NodeJS.Timeout | undefined;
  await new Promise<void>((resolve) => {
    timer = setTimeout(() => {
      // Every loop still running has one operation stuck in flight.
      errors += pending;
      errorSamples['timeout'] = (errorSamples['timeout'] ?? 0) + pending;
      resolve();
    }, budget.durationMs + budget.graceMs);
    for (let slot = 0; slot < slots; slot++) {
      loop(slot, recorder)
        .catch((err: unknown) => recorder.fail(`driver: ${(err as Error).message}`))
        .finally(() => {
          pending -= 1;
          if (pending === 0) resolve();
        });
    }
  });
  clearTimeout(timer);
  closed = true;
  return { ops, errors, elapsedMs: performance.now() - started, histogram: histogram.toJSON(), errorSamples };
}

/**
 * A slot loop that repeats one timed operation while the phase wants more:
 * `op` resolves with a problem (counted as an error) or undefined (counted
 * with its latency).
 */
export function timedLoop(op: (slot: number) => Promise<string | undefined>): SlotLoop {
  return async (slot, recorder) => {
    while (recorder.more()) {
      const started = process.hrtime.bigint();
      const problem = await op(slot);
      if (problem) recorder.fail(problem);
      else recorder.ok(elapsedUs(started));
    }
  };
}

export function elapsedUs(startNs: bigint): number {
  return Number(process.hrtime.bigint() - startNs) / 1000;
}

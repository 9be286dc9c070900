import type { DriverSpec } from '../protocol.js';
import type { SlotLoop } from './phase.js';

/** A closed-loop load: `slots` loops, each doing one operation after another. */
export interface Load {
  /** Opens connections before the clock starts. */
  prepare(): Promise<void>;
  readonly slots: number;
  readonly loop: SlotLoop;
  close(): void;
}

export type LoadFactory = (spec: DriverSpec) => Load;

import { randomBytes } from 'node:crypto';
import { TlsMaterialError } from '../errors.js';
import type { ValidityOptions } from './types.js';

const DAY_MS = 24 * 60 * 60 * 1000;
/** Backdating absorbs small clock differences between the machine that issues and the one that verifies. */
export const CLOCK_SKEW_MS = 5 * 60 * 1000;

export interface Validity {
  notBefore: Date;
  notAfter: Date;
}

export function validityPeriod(o: ValidityOptions, now = new Date()): Validity {
  const days = o.days ?? 1;
  assertPositiveDays(days);
  const start = o.notBefore ?? now;
  const notAfter = addDays(start, days);
  return {
    notBefore: o.notBefore ?? new Date(now.getTime() - CLOCK_SKEW_MS),
    notAfter: o.notAfterCap && o.notAfterCap < notAfter ? o.notAfterCap : notAfter,
  };
}

export function addDays(from: Date, days: number): Date {
  return new Date(from.getTime() + days * DAY_MS);
}

export function assertPositiveDays(days: number): void {
  if (!Number.isFinite(days) || days <= 0) throw new TlsMaterialError(`validity must be a positive number of days, got ${days}`);
}

/**
 * 16 random bytes as a positive DER INTEGER: the top bit is cleared (else it would read as negative)
 * and the first byte is non-zero (else DER would drop it and the serial would shrink).
 */
export function randomSerialHex(): string {
  const bytes = randomBytes(16);
  bytes[0] = (bytes[0]! & 0x7f) || 0x01;
  return bytes.toString('hex');
}

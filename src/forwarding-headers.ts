import type { ConnectionContext } from './listeners.js';

/** The verified client identity, as Envoy names it; any copy a client sends is replaced. */
export const XFCC = 'x-forwarded-client-cert';

/** X-Forwarded-For: what the client claims about earlier hops is kept, and its own address appended. */
export function forwardedFor(previous: readonly string[], context: ConnectionContext): string {
  return [...previous, context.remoteAddress ?? 'unknown'].join(', ');
}

/** The headers that say who the client is and how it came: ours to set, in both forwarders. */
export function setForwardingHeaders(out: Record<string, unknown>, clientForwardedFor: string | string[] | undefined, context: ConnectionContext): void {
  // Per call and request: most clients send none, and then no list is built.
  out['x-forwarded-for'] = clientForwardedFor === undefined ? (context.remoteAddress ?? 'unknown') : forwardedFor([clientForwardedFor].flat(), context);
  out['x-forwarded-proto'] = 'https';
  out[XFCC] = context.identity.xfcc;
}

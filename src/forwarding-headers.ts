import type { ConnectionContext } from './listeners.js';

/** The verified client identity, as Envoy names it; any copy a client sends is replaced. */
export const XFCC = 'x-forwarded-client-cert';

/** The fields we set on every forwarded request and call. */
export const FORWARDING_FIELDS: ReadonlySet<string> = new Set([XFCC, 'x-forwarded-for', 'x-forwarded-proto']);

/**
 * A (lower-case) name that is one of ours with underscores for hyphens
 * (`x_forwarded_client_cert`). Servers behind CGI-style gateways (WSGI, PHP)
 * read both spellings as the same variable, so a client's copy could stand in
 * for ours: it is dropped, where nginx drops every name with an underscore.
 */
export function disguisesOurs(name: string): boolean {
  return name.includes('_') && FORWARDING_FIELDS.has(name.replaceAll('_', '-'));
}

/** X-Forwarded-For: what the client claims about earlier hops is kept, and its own address appended. */
export function forwardedFor(previous: readonly string[], context: ConnectionContext): string {
  return [...previous, context.remoteAddress ?? 'unknown'].join(', ');
}

/** X-Forwarded-For as we send it; `client`: the client's own, whose lines Node's headers object joins with ", ". */
function forwardedForValue(client: string | string[] | undefined, context: ConnectionContext): string {
  // Per call and request: most clients send none, and then no list is built.
  return client === undefined ? (context.remoteAddress ?? 'unknown') : forwardedFor([client].flat(), context);
}

/** The headers that say who the client is and how it came: ours to set, in both forwarders. */
export function setForwardingHeaders(out: Record<string, unknown>, clientForwardedFor: string | string[] | undefined, context: ConnectionContext): void {
  out['x-forwarded-for'] = forwardedForValue(clientForwardedFor, context);
  out['x-forwarded-proto'] = 'https';
  out[XFCC] = context.identity.xfcc;
}

/** setForwardingHeaders() for a flat name, value list. */
export function pushForwardingFields(out: string[], clientForwardedFor: string | string[] | undefined, context: ConnectionContext): void {
  out.push('x-forwarded-for', forwardedForValue(clientForwardedFor, context), 'x-forwarded-proto', 'https', XFCC, context.identity.xfcc);
}

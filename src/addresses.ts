/** How IP addresses and host names are written where a user or a model server reads them. */
import { isIPv4, isIPv6 } from 'node:net';
import { domainToASCII } from 'node:url';

/**
 * `host:port` as RFC 3986 writes an authority: an IPv6 address in brackets
 * (`[::1]:9000`). Without them `:::9443` or `::1:9000` cannot be split, and
 * cannot be pasted into a URL, a curl command or --mtls_grpc_upstream.
 */
/** An absolute-form request target (`http://host:port/path`); its authority is the first group. */
export const ABSOLUTE_FORM = /^https?:\/\/([^/?#]*)/i;

export function hostAndPort(host: string, port: number | string): string {
  return `${host.includes(':') ? `[${host}]` : host}:${port}`;
}

/** `[::1]` as `::1`: the bracketed spelling of URLs and nginx's `listen`, which users give where an address is asked for. */
export function unbracketed(host: string): string {
  const inner = /^\[(.*)\]$/.exec(host)?.[1];
  return inner !== undefined && isIPv6(inner) ? inner : host;
}

const IPV4_MAPPED = '::ffff:';

/**
 * A client's address as the logs and X-Forwarded-For name it. A dual-stack `::`
 * listener receives IPv4 clients as IPv4-mapped IPv6 addresses (`::ffff:10.1.2.3`,
 * RFC 4291 2.5.5.2), where a 0.0.0.0 listener, or nginx's `[::]` (IPv6-only by
 * default, IPv4 arriving on its IPv4 socket), shows `10.1.2.3`: the same client
 * would change address with our bind setting, and a model server's IPv4 allow-list,
 * log search or rate limit would miss it. Envoy unmaps them too (ipv4_compat).
 */
export function clientAddress(address: string | undefined): string | undefined {
  if (address === undefined || !address.startsWith(IPV4_MAPPED)) return address;
  const ipv4 = address.slice(IPV4_MAPPED.length);
  return isIPv4(ipv4) ? ipv4 : address;
}

/**
 * A host name in another script (bücher.example) as its A-label (xn--bcher-kva.example): a
 * certificate holds only those (RFC 5280 7.2), and they are what clients look up and match. An
 * ASCII name, and one with white space or a control character, which domainToASCII would drop
 * silently, come back as given, for the caller to refuse; '' for one it cannot convert.
 */
export function aLabel(name: string): string {
  return /\P{ASCII}/u.test(name) && !/[\p{Cc}\s]/u.test(name) ? domainToASCII(name) : name;
}

/** An address range in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`; a bare address is the range of it alone). */
export interface Subnet {
  readonly address: string;
  readonly prefix: number;
  readonly family: 'ipv4' | 'ipv6';
}

/** `text` as a Subnet (an IPv4-mapped IPv6 range as its IPv4 one, as clientAddress names those clients), or undefined if it is none. */
export function parseSubnet(text: string): Subnet | undefined {
  const match = /^([^/]+?)(?:\/(\d{1,3}))?$/.exec(text.trim());
  if (!match) return undefined;
  const address = unbracketed(match[1]!);
  const family = isIPv4(address) ? 'ipv4' : isIPv6(address) && !address.includes('%') ? 'ipv6' : undefined;
  if (family === undefined) return undefined;
  const bits = family === 'ipv4' ? 32 : 128;
  const prefix = match[2] === undefined ? bits : Number(match[2]);
  if (prefix > bits) return undefined;
  const mapped = family === 'ipv6' ? clientAddress(address) : address;
  if (mapped !== address && prefix >= 96) return { address: mapped!, prefix: prefix - 96, family: 'ipv4' };
  return { address, prefix, family };
}


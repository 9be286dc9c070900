/** Checks of `ovms-mtls certs` options: each failure is a one-line ConfigError naming the flag. */
import { isIP } from 'node:net';
import { ConfigError } from '../errors.js';
import { aLabel } from '../addresses.js';
import { KEY_KINDS, type KeyKind } from '../x509.js';

// Files of the PKI itself, which `certs client --name` must not overwrite.
const RESERVED_CLIENT_NAMES = new Set(['server', 'server_ca', 'client_cert_ca']);
const MAX_DAYS = 36500;

/** Parses one `--san` entry. Exported for the CLI's option validation. */
export function parseSanEntry(entry: string): { dns?: string; ip?: string } {
  const match = /^(DNS|IP):(.+)$/i.exec(entry.trim());
  const hint = 'expected DNS:<name> or IP:<address>, e.g. DNS:ovms.example.com or IP:10.0.0.5';
  if (!match) throw new ConfigError(`--san "${entry}": ${hint}`);
  const [, kind, value] = match as unknown as [string, string, string];
  if (kind.toUpperCase() === 'IP') {
    if (isIP(value) === 0) throw new ConfigError(`--san "${entry}": "${value}" is not an IPv4 or IPv6 address (${hint})`);
    // A SAN holds the 16 address bytes only; the library would drop the zone without a word.
    const zone = value.indexOf('%');
    if (zone !== -1) throw new ConfigError(`--san "${entry}": a certificate cannot hold a zone (${value.slice(zone)}); write IP:${value.slice(0, zone)}, the address without it`);
    return { ip: value };
  }
  return { dns: checkDnsName(value, `--san "${entry}":`) };
}

export function serverSubjectAltNames(serverName: string, extra: string[]): { dns: string[]; ips: string[] } {
  const dns = new Set<string>();
  const ips = new Set<string>();
  if (isIP(serverName) !== 0) ips.add(serverName);
  else dns.add(checkDnsName(serverName, '--server_name'));
  // Clients dialling the loopback address by number must match too.
  if (serverName === 'localhost') ['127.0.0.1', '::1'].forEach((ip) => ips.add(ip));
  for (const entry of extra) {
    const parsed = parseSanEntry(entry);
    if (parsed.dns) dns.add(parsed.dns);
    if (parsed.ip) ips.add(parsed.ip);
  }
  return { dns: [...dns], ips: [...ips] };
}

/**
 * A name in another script (bücher.example) is returned as its A-label (xn--bcher-kva.example): a certificate
 * holds only those (RFC 5280 7.2), and that is the name curl, browsers and Python's idna codec look up and match.
 */
export function checkDnsName(value: string, what: string): string {
  const label = '[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?';
  const hostname = new RegExp(`^(\\*\\.)?${label}(\\.${label})*\\.?$`);
  const name = aLabel(value);
  if (name.length > 253 || !hostname.test(name)) {
    throw new ConfigError(`${what} "${value}" is not a valid DNS name (letters, digits, '-', '.', optional leading '*.'; letters of any script)`);
  }
  return name;
}

// RFC 3986's characters (unreserved, reserved, '%'). A URI SAN is an IA5String: a non-ASCII byte makes Go's
// crypto/x509 ('SAN uniformResourceIdentifier is malformed') and Python's cryptography refuse the whole certificate.
const URI_CHARACTERS = /^[A-Za-z0-9\-._~:/?#[\]@!$&'()*+,;=%]+$/;

export function checkUri(value: string): string {
  if (!/^[A-Za-z][A-Za-z0-9+.-]*:/.test(value) || !URL.canParse(value)) {
    throw new ConfigError(`--uri "${value}" is not an absolute URI, e.g. spiffe://example.org/ns/ml/sa/client`);
  }
  if (!URI_CHARACTERS.test(value)) {
    throw new ConfigError(`--uri "${value}" holds characters a URI cannot (spaces, non-ASCII letters, <>"{}|\\^\`); percent-encode them, e.g. "${new URL(value).href}"`);
  }
  return value;
}

export function checkClientName(name: string): string {
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(name)) {
    throw new ConfigError(`--name "${name}": use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit`);
  }
  if (RESERVED_CLIENT_NAMES.has(name)) throw new ConfigError(`--name "${name}" would overwrite the PKI's own files; choose another name`);
  return name;
}

export function checkDays(days: number): number {
  if (!Number.isInteger(days) || days < 1 || days > MAX_DAYS) {
    throw new ConfigError(`--days ${days}: use a whole number of days from 1 to ${MAX_DAYS}`);
  }
  return days;
}

export function checkKeyKind(key: string): KeyKind {
  if (!(KEY_KINDS as readonly string[]).includes(key)) throw new ConfigError(`--key ${key}: use one of ${KEY_KINDS.join(', ')}`);
  return key as KeyKind;
}

/**
 * Host names given as bind addresses (`--grpc_bind_address localhost`). Node's
 * listen(port, name) binds the first address the name resolves to; OVMS (gRPC
 * C-core) and nginx bind every one, so `localhost` listens on 127.0.0.1 and on
 * ::1 where /etc/hosts lists both. Names are resolved once, at start, in the
 * process that owns the sockets; the listeners and the workers get addresses.
 */
import { lookup as dnsLookup } from 'node:dns/promises';
import { isIP } from 'node:net';
import { canonicalAddress, checkAdminPort, refuseCoveredAddresses, type BindSpec, type PublicListenerSpec } from './config.js';
import { ConfigError } from './errors.js';
import { hostAndPort } from './addresses.js';
import type { Logger } from './log.js';

/** A name's addresses, in the order the system gives them (dns.lookup, all, verbatim). */
export type Lookup = (name: string) => Promise<readonly { readonly address: string }[]>;

const systemLookup: Lookup = (name) => dnsLookup(name, { all: true, verbatim: true });

/** `hosts` with each name replaced by its addresses, repeats bound once; `resolvedFrom` says which name each came from. */
export async function resolveBindAddresses(flagName: string, hosts: readonly string[], lookup: Lookup = systemLookup): Promise<BindSpec> {
  const addresses: string[] = [];
  const resolvedFrom: Record<string, string> = {};
  for (const host of hosts) {
    if (isIP(host) !== 0) {
      addresses.push(host);
      continue;
    }
    for (const address of await addressesOf(flagName, host, lookup)) {
      const canonical = canonicalAddress(address);
      addresses.push(canonical);
      // The first name wins; with `127.0.0.1,localhost` too, so that localhost counts as served by 127.0.0.1.
      resolvedFrom[canonical] ??= host;
    }
  }
  const unique = [...new Set(addresses)];
  refuseCoveredAddresses(flagName, unique, resolvedFrom);
  return Object.keys(resolvedFrom).length === 0 ? { hosts: unique } : { hosts: unique, resolvedFrom };
}

async function addressesOf(flagName: string, name: string, lookup: Lookup): Promise<string[]> {
  let found: readonly { readonly address: string }[];
  try {
    found = await lookup(name);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? String(err);
    throw new ConfigError(`--${flagName}: '${name}' does not resolve to an address (${code}); give an IP address, or a name /etc/hosts or DNS knows`, { cause: err });
  }
  if (found.length === 0) throw new ConfigError(`--${flagName}: '${name}' does not resolve to an address; give an IP address, or a name /etc/hosts or DNS knows`);
  return found.map((a) => a.address);
}

interface Binds<L, A> {
  readonly grpc?: L | undefined;
  readonly rest?: L | undefined;
  readonly admin?: A | undefined;
}

/**
 * Every listener's names resolved (public and admin), then the admin port checked again on
 * the addresses: `localhost` and `127.0.0.1` on one port are one address.
 */
export async function resolveListenAddresses<L extends PublicListenerSpec, A extends BindSpec & { readonly port: number }>(binds: Binds<L, A>, lookup: Lookup = systemLookup): Promise<Binds<L, A>> {
  const resolve = async <S extends BindSpec>(flagName: string, spec: S | undefined): Promise<S | undefined> => (spec ? { ...spec, ...(await resolveBindAddresses(flagName, spec.hosts, lookup)) } : undefined);
  const resolved = {
    grpc: await resolve('grpc_bind_address', binds.grpc),
    rest: await resolve('rest_bind_address', binds.rest),
    admin: await resolve('mtls_admin_bind_address', binds.admin),
  };
  checkAdminPort(resolved.admin, resolved);
  return resolved;
}

/**
 * Errors that say this machine has no such address (EADDRNOTAVAIL) or no IPv6 at all
 * (EAFNOSUPPORT, a kernel booted with ipv6.disable=1): no client can reach the address,
 * so nothing is lost by serving the name's other addresses. A port in use or a
 * privileged port is refused as for any address: a client of `localhost` could reach
 * another process on the address we could not take.
 */
const NOT_ON_THIS_MACHINE: Readonly<Record<string, string>> = {
  EADDRNOTAVAIL: 'the address is not on this machine',
  EAFNOSUPPORT: 'IPv6 is turned off on this machine',
};

/** An address of a host name that could not be bound, and why. */
export interface SkippedAddress {
  readonly address: string;
  readonly name: string;
  readonly reason: string;
}

/**
 * Binds each address with `bind` (in order: a port 0 is chosen by the first). An address
 * a host name resolved to that is not on this machine is skipped, reported in `skipped`,
 * as long as another address of the same name binds; anything else rejects, as does a
 * name none of whose addresses could be bound (with its first error).
 */
export async function bindEach(spec: BindSpec, bind: (host: string) => Promise<void>): Promise<SkippedAddress[]> {
  const skipped: (SkippedAddress & { error: unknown })[] = [];
  const boundNames = new Set<string>();
  for (const host of spec.hosts) {
    const name = spec.resolvedFrom?.[host];
    try {
      await bind(host);
      if (name !== undefined) boundNames.add(name);
    } catch (error) {
      const reason = NOT_ON_THIS_MACHINE[errnoOf(error) ?? ''];
      if (name === undefined || reason === undefined) throw error;
      skipped.push({ address: host, name, reason, error });
    }
  }
  const lost = skipped.find((s) => !boundNames.has(s.name));
  if (lost) throw lost.error;
  return skipped.map(({ address, name, reason }) => ({ address, name, reason }));
}

/** The system's code of a bind error, also when wrapped in a ListenError. */
function errnoOf(error: unknown): string | undefined {
  const err = error as NodeJS.ErrnoException & { cause?: NodeJS.ErrnoException };
  return err.cause?.code ?? err.code;
}

/** A host name's address not bound (not on this machine): a warning; the listener serves the name's other addresses. */
export function logSkipped(logger: Logger, listener: string, flagName: string, port: number, skipped: SkippedAddress): void {
  const at = hostAndPort(skipped.address, port);
  logger.warn(
    { event: 'bind_skipped', listener, name: skipped.name, address: at, reason: skipped.reason },
    `--${flagName}: ${skipped.name} also resolves to ${skipped.address}, not bound (${at}: ${skipped.reason}); ${listener} serves ${skipped.name} on its other addresses`,
  );
}

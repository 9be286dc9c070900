/**
 * The PROXY protocol (HAProxy's specification, versions 1 and 2): an L4 load balancer in front
 * (AWS NLB, HAProxy, a cloud Service of type LoadBalancer) connects to us from its own address and
 * writes, before the client's first byte, a header naming the client's. Without it every access
 * line, refusal and X-Forwarded-For named the load balancer. With --mtls_proxy_protocol every
 * connection must begin with one (as nginx's `listen ... proxy_protocol`), or, with
 * --mtls_proxy_protocol_from, every connection from the load balancers' addresses and none from
 * elsewhere: accepting it from whoever sends it would let any client name itself.
 */
import { BlockList, SocketAddress, isIPv4, isIPv6, type Socket } from 'node:net';
import { clientAddress } from './addresses.js';
import type { ProxyProtocolSettings } from './config.js';

/** The reasons a connection is closed before its TLS handshake begins (handshake-failures.ts words them). */
type HeaderFailure = 'proxy_protocol_missing' | 'proxy_protocol_invalid' | 'client_closed' | 'handshake_timeout';

/** A whole header: its length in bytes, and the client's address (undefined: keep the connection's own). */
interface ProxyHeader {
  readonly length: number;
  readonly source: string | undefined;
  /** Version 2's LOCAL command: the load balancer's own connection, a health check, with no client behind it. */
  readonly local?: true;
}

interface Unreadable {
  readonly failure: 'proxy_protocol_missing' | 'proxy_protocol_invalid';
  readonly why: string;
}

const V1_PREFIX = Buffer.from('PROXY ', 'latin1');
/** The spec's bound: 'PROXY TCP6 ' + two full IPv6 addresses + two ports + spaces + CRLF. */
const V1_MAX_LENGTH = 107;
const V2_SIGNATURE = Buffer.from([0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a]);
const V2_FIXED_LENGTH = 16;
/**
 * Version 2 allows 64 KiB of extensions; load balancers send tens of bytes (an AWS VPC endpoint id,
 * HAProxy's unique id or TLS fields). A client sending 64 KiB a byte at a time would have each byte
 * copy all before it (2 GB in all): a bound, nginx's too, keeps that small.
 */
const V2_MAX_LENGTH = 4096;

/** Whether `bytes` begins as `prefix` does, as far as either goes. */
function beginsLike(bytes: Buffer, prefix: Buffer): boolean {
  const n = Math.min(bytes.length, prefix.length);
  return bytes.subarray(0, n).equals(prefix.subarray(0, n));
}

/** What begins `bytes`: a header, a reason it cannot be one, or undefined while more bytes are needed. */
export function parseProxyHeader(bytes: Buffer): ProxyHeader | Unreadable | undefined {
  if (beginsLike(bytes, V2_SIGNATURE)) return bytes.length < V2_SIGNATURE.length ? undefined : parseV2(bytes);
  if (beginsLike(bytes, V1_PREFIX)) return bytes.length < V1_PREFIX.length ? undefined : parseV1(bytes);
  return { failure: 'proxy_protocol_missing', why: `the connection began with ${firstBytes(bytes)}` };
}

function firstBytes(bytes: Buffer): string {
  // 0x16 is a TLS handshake record: a client that connected past the load balancer.
  if (bytes[0] === 0x16) return 'a TLS handshake, not a PROXY header';
  const shown = bytes.subarray(0, 8).toString('latin1').replace(/[^\x20-\x7e]/g, '.');
  return `"${shown}", not a PROXY header`;
}

function invalid(why: string): Unreadable {
  return { failure: 'proxy_protocol_invalid', why };
}

function parseV1(bytes: Buffer): ProxyHeader | Unreadable | undefined {
  const end = bytes.subarray(0, V1_MAX_LENGTH).indexOf('\r\n');
  if (end === -1) return bytes.length < V1_MAX_LENGTH ? undefined : invalid(`a version 1 header has no CRLF within ${V1_MAX_LENGTH} bytes`);
  const line = bytes.subarray(0, end).toString('latin1');
  const fields = line.split(' ');
  const length = end + 2;
  if (fields[1] === 'UNKNOWN') return { length, source: undefined };
  if (fields.length !== 6) return invalid(`a version 1 header needs 6 fields: "${printable(line)}"`);
  const [, family, source, destination, sourcePort, destinationPort] = fields as [string, string, string, string, string, string];
  if (family !== 'TCP4' && family !== 'TCP6') return invalid(`version 1 protocol "${printable(family)}" (TCP4, TCP6 or UNKNOWN)`);
  const ipFamily = family === 'TCP4' ? 'ipv4' : 'ipv6';
  for (const address of [source, destination]) {
    if (!isAddressOf(address, ipFamily)) return invalid(`"${printable(address)}" is not an ${family === 'TCP4' ? 'IPv4' : 'IPv6'} address`);
  }
  for (const port of [sourcePort, destinationPort]) {
    if (!/^(0|[1-9]\d{0,4})$/.test(port) || Number(port) > 65535) return invalid(`"${printable(port)}" is not a port`);
  }
  return { length, source: clientAddress(new SocketAddress({ address: source, family: ipFamily }).address) };
}

/** A zone (`fe80::1%eth0`) names an interface of the load balancer's host, not of ours. */
function isAddressOf(text: string, family: 'ipv4' | 'ipv6'): boolean {
  return family === 'ipv4' ? isIPv4(text) : isIPv6(text) && !text.includes('%');
}

function printable(text: string): string {
  return text.slice(0, 48).replace(/[^\x20-\x7e]/g, '.');
}

const V2_LOCAL = 0x0;
const V2_PROXY = 0x1;
/** Address families (high nibble of byte 13) and the length of their address block. */
const V2_INET = 0x1;
const V2_INET6 = 0x2;
const V2_ADDRESS_BYTES: Record<number, number> = { [V2_INET]: 12, [V2_INET6]: 36 };

function parseV2(bytes: Buffer): ProxyHeader | Unreadable | undefined {
  if (bytes.length < V2_FIXED_LENGTH) return undefined;
  const version = bytes[12]! >> 4;
  const command = bytes[12]! & 0x0f;
  if (version !== 2) return invalid(`version ${version} after the version 2 signature`);
  if (command !== V2_LOCAL && command !== V2_PROXY) return invalid(`version 2 command ${command} (0 LOCAL or 1 PROXY)`);
  const family = bytes[13]! >> 4;
  const transport = bytes[13]! & 0x0f;
  const length = V2_FIXED_LENGTH + bytes.readUInt16BE(14);
  if (length > V2_MAX_LENGTH) return invalid(`a version 2 header of ${length} bytes, over the ${V2_MAX_LENGTH} read`);
  if (bytes.length < length) return undefined;
  if (command === V2_LOCAL) return { length, source: undefined, local: true };
  // UNSPEC and AF_UNIX carry no IP address.
  if (family === 0x0 || family === 0x3) return { length, source: undefined };
  if (family !== V2_INET && family !== V2_INET6) return invalid(`version 2 address family ${family}`);
  if (transport !== 0x1) return invalid(`version 2 transport ${transport}, not STREAM (TCP)`);
  const needed = V2_ADDRESS_BYTES[family]!;
  if (length - V2_FIXED_LENGTH < needed) return invalid(`a version 2 ${family === V2_INET ? 'IPv4' : 'IPv6'} address block of ${length - V2_FIXED_LENGTH} bytes (${needed} needed)`);
  const block = bytes.subarray(V2_FIXED_LENGTH);
  return { length, source: family === V2_INET ? block.subarray(0, 4).join('.') : ipv6Text(block.subarray(0, 16)) };
}

function ipv6Text(raw: Buffer): string {
  const groups = Array.from({ length: 8 }, (_, i) => raw.readUInt16BE(i * 2).toString(16));
  return clientAddress(new SocketAddress({ address: groups.join(':'), family: 'ipv6' }).address)!;
}

/** One end of a TCP connection, as a header names it. */
export interface Endpoint {
  readonly address: string;
  readonly port: number;
}

/**
 * The header a load balancer writes for a connection from `source` to `destination`, in version 1
 * (text) or 2 (binary): what `probe --proxy_protocol` sends first, so that a port started with
 * --mtls_proxy_protocol can be checked from inside the cluster, past its load balancer.
 */
export function proxyHeader(version: 1 | 2, source: Endpoint, destination: Endpoint): Buffer {
  const from = asWritten(source);
  const to = asWritten(destination);
  // The two ends of a connection share a family.
  const ipv6 = isIPv6(from.address);
  if (version === 1) return Buffer.from(`PROXY ${ipv6 ? 'TCP6' : 'TCP4'} ${from.address} ${to.address} ${from.port} ${to.port}\r\n`, 'latin1');
  const addressBytes = ipv6 ? ipv6Bytes : (address: string) => Buffer.from(address.split('.').map(Number));
  const ports = Buffer.alloc(4);
  ports.writeUInt16BE(from.port, 0);
  ports.writeUInt16BE(to.port, 2);
  const block = Buffer.concat([addressBytes(from.address), addressBytes(to.address), ports]);
  const fixed = Buffer.from([0x20 | V2_PROXY, ((ipv6 ? V2_INET6 : V2_INET) << 4) | 0x1, 0, 0]);
  fixed.writeUInt16BE(block.length, 2);
  return Buffer.concat([V2_SIGNATURE, fixed, block]);
}

/** An end as a header may name it: a dual-stack socket's IPv4 end (::ffff:a.b.c.d) as IPv4, no zone (it means nothing to the reader). */
function asWritten({ address, port }: Endpoint): Endpoint {
  return { address: clientAddress(address.replace(/%.*$/, ''))!, port };
}

/** An IPv6 address's 16 bytes, from any of its text forms (`::` shortened, an IPv4 tail). */
function ipv6Bytes(address: string): Buffer {
  const ipv4Tail = /:(\d+\.\d+\.\d+\.\d+)$/.exec(address);
  const text = ipv4Tail ? `${address.slice(0, ipv4Tail.index)}:${ipv4AsGroups(ipv4Tail[1]!)}` : address;
  const [head, tail] = text.split('::') as [string, string | undefined];
  const groups = (part: string | undefined): string[] => (part ? part.split(':') : []);
  const zeros = Array<string>(8 - groups(head).length - groups(tail).length).fill('0');
  const all = tail === undefined ? groups(head) : [...groups(head), ...zeros, ...groups(tail)];
  const bytes = Buffer.alloc(16);
  all.forEach((group, i) => bytes.writeUInt16BE(parseInt(group, 16), i * 2));
  return bytes;
}

function ipv4AsGroups(ipv4: string): string {
  const [a, b, c, d] = ipv4.split('.').map(Number) as [number, number, number, number];
  return `${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}`;
}

/**
 * Whether a connection from `remote` must begin with a header. Others go to TLS as they are, so a
 * header from elsewhere fails there as not TLS.
 */
export function headerExpected(settings: ProxyProtocolSettings | undefined): (remote: string | undefined) => boolean {
  if (settings === undefined) return () => false;
  if (settings.from.length === 0) return () => true;
  const balancers = new BlockList();
  for (const { address, prefix, family } of settings.from) balancers.addSubnet(address, prefix, family);
  // BlockList matches an IPv4 client of a dual-stack listener (::ffff:a.b.c.d) against the IPv4 ranges itself.
  return (remote) => remote !== undefined && balancers.check(remote, isIPv4(remote) ? 'ipv4' : 'ipv6');
}

/** What waiting for the header ended with: the client's address (undefined: the connection's own), or why it is closed. */
type HeaderOutcome = Omit<ProxyHeader, 'length'> | { readonly failure: HeaderFailure; readonly why?: string };

/**
 * Reads the header off `socket` and calls `then` once: on success with the bytes after it put back
 * and the socket paused, so a TLS server given it next reads them first (Node's TLSSocket takes
 * what the socket holds before reading the handle). A socket we destroy meanwhile (a shutdown's
 * destroyAll) is not the client's doing, and was never a handshake that failed: `then` is not called.
 */
export function awaitProxyHeader(socket: Socket, timeoutMs: number, then: (outcome: HeaderOutcome) => void): void {
  let held: Buffer = Buffer.alloc(0);
  const stopWaiting = (): void => {
    clearTimeout(timer);
    socket.off('data', onData).off('end', onClosed).off('error', onClosed).off('close', stopWaiting);
  };
  const finish = (outcome: HeaderOutcome): void => {
    stopWaiting();
    then(outcome);
  };
  const onData = (chunk: Buffer): void => {
    held = held.length === 0 ? chunk : Buffer.concat([held, chunk]);
    const parsed = parseProxyHeader(held);
    if (parsed === undefined) return;
    if ('failure' in parsed) return finish(parsed);
    socket.pause();
    if (held.length > parsed.length) socket.unshift(held.subarray(parsed.length));
    finish(parsed);
  };
  const onClosed = (): void => finish({ failure: 'client_closed' });
  const timer = setTimeout(() => finish({ failure: 'handshake_timeout' }), timeoutMs);
  // A client's FIN is 'end', its reset 'error'; 'close' alone is our own destroy().
  socket.on('data', onData).on('end', onClosed).on('error', onClosed).on('close', stopWaiting);
}

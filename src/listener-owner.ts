/**
 * Whose is the socket listening on a loopback port? Between choosing OVMS's
 * port and OVMS binding it another process can take it; a plain "does the
 * port answer" check would then call that process OVMS and send it traffic.
 * Linux tells us: /proc/net/tcp{,6} maps listening ports to socket inodes,
 * and /proc/<pid>/fd links to the sockets a process holds.
 */
import { readFile, readdir, readlink } from 'node:fs/promises';

const TCP_LISTEN = '0A';

/** Inodes of sockets in LISTEN state on `port` (any local address), from /proc/net/tcp text. */
export function listeningInodes(procNetTcp: string, port: number): string[] {
  const inodes: string[] = [];
  for (const line of procNetTcp.split('\n').slice(1)) {
    const fields = line.trim().split(/\s+/);
    if (fields.length < 10) continue;
    const local = fields[1]!;
    const localPort = parseInt(local.slice(local.lastIndexOf(':') + 1), 16);
    if (localPort === port && fields[3] === TCP_LISTEN) inodes.push(fields[9]!);
  }
  return inodes;
}

async function readOrEmpty(path: string): Promise<string> {
  try {
    return await readFile(path, 'utf8');
  } catch {
    return '';
  }
}

/**
 * 'ours' when `pid` holds a socket listening on `port`, 'foreign' when only
 * other processes do, 'none' when nothing listens, 'unknown' when /proc does
 * not tell (not Linux, or the process's fds are not readable to us).
 */
export async function listenerOwner(pid: number, port: number): Promise<'ours' | 'foreign' | 'none' | 'unknown'> {
  const tables = await Promise.all([readOrEmpty('/proc/net/tcp'), readOrEmpty('/proc/net/tcp6')]);
  if (!tables[0] && !tables[1]) return 'unknown';
  const inodes = new Set(tables.flatMap((t) => listeningInodes(t, port)));
  if (inodes.size === 0) return 'none';
  let fds: string[];
  try {
    fds = await readdir(`/proc/${pid}/fd`);
  } catch {
    return 'unknown';
  }
  for (const fd of fds) {
    const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '');
    const inode = /^socket:\[(\d+)\]$/.exec(target)?.[1];
    if (inode !== undefined && inodes.has(inode)) return 'ours';
  }
  return 'foreign';
}

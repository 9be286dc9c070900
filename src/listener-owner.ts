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

export async function readOrEmpty(path: string): Promise<string> {
  try {
    return await readFile(path, 'utf8');
  } catch {
    return '';
  }
}

/** Whether `pid` holds one of `inodes`; undefined when its fds cannot be read (gone, or not ours to read). */
async function holdsOneOf(pid: number, inodes: ReadonlySet<string>): Promise<boolean | undefined> {
  let fds: string[];
  try {
    fds = await readdir(`/proc/${pid}/fd`);
  } catch {
    return undefined;
  }
  for (const fd of fds) {
    const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '');
    const inode = /^socket:\[(\d+)\]$/.exec(target)?.[1];
    if (inode !== undefined && inodes.has(inode)) return true;
  }
  return false;
}

/**
 * The fields of a /proc/<pid>/stat text after the command name, which is in parentheses and may
 * hold spaces and parentheses itself: state, ppid, process group, ...
 */
export function statFields(stat: string): string[] {
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ');
}

function processGroupOf(stat: string): number | undefined {
  const group = statFields(stat)[2];
  return group !== undefined && /^\d+$/.test(group) ? Number(group) : undefined;
}

/** The other processes of the group `leader` leads. */
async function groupMembers(leader: number): Promise<number[]> {
  const pids = (await readdir('/proc').catch(() => [])).filter((name) => /^\d+$/.test(name) && Number(name) !== leader);
  const members = await Promise.all(pids.map(async (pid) => (processGroupOf(await readOrEmpty(`/proc/${pid}/stat`)) === leader ? Number(pid) : undefined)));
  return members.filter((pid): pid is number => pid !== undefined);
}

/**
 * 'ours' when `pid`, or a process of the group it leads, holds a socket listening on `port`;
 * 'foreign' when only other processes do, 'none' when nothing listens, 'unknown' when /proc does
 * not tell (not Linux, or the process's fds are not readable to us). The group counts because
 * OVMS leads one (ovms-child.ts spawnChild): a script given as --mtls_ovms_binary that runs OVMS
 * without `exec` leaves OVMS a child in it, and OVMS was never seen ready (503 for ever).
 */
export async function listenerOwner(pid: number, port: number): Promise<'ours' | 'foreign' | 'none' | 'unknown'> {
  const tables = await Promise.all([readOrEmpty('/proc/net/tcp'), readOrEmpty('/proc/net/tcp6')]);
  if (!tables[0] && !tables[1]) return 'unknown';
  const inodes = new Set(tables.flatMap((t) => listeningInodes(t, port)));
  if (inodes.size === 0) return 'none';
  const held = await holdsOneOf(pid, inodes);
  if (held === undefined) return 'unknown';
  if (held) return 'ours';
  for (const member of await groupMembers(pid)) {
    if (await holdsOneOf(member, inodes)) return 'ours';
  }
  return 'foreign';
}

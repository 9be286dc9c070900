/**
 * CPU time and memory of a process tree, read from /proc. CPU is the kernel's
 * own accounting of the process (all threads, user + system), so a proxy's
 * figure holds however busy the load driver keeps the rest of the machine.
 */
import { readFileSync, readdirSync } from 'node:fs';

const TICKS_PER_SECOND = 100; // USER_HZ; `getconf CLK_TCK` is 100 on every Linux we run on.

function readStat(pid: number): string[] | undefined {
  try {
    const text = readFileSync(`/proc/${pid}/stat`, 'latin1');
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    return text.slice(text.lastIndexOf(')') + 2).split(' ');
  } catch {
    return undefined;
  }
}

/** `root` and every descendant alive now (cluster workers, nginx workers). */
export function processTree(root: number): number[] {
  const children = new Map<number, number[]>();
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const fields = readStat(Number(entry));
    if (!fields) continue;
    const ppid = Number(fields[1]);
    const list = children.get(ppid) ?? [];
    list.push(Number(entry));
    children.set(ppid, list);
  }
  const tree: number[] = [];
  const queue = [root];
  while (queue.length > 0) {
    const pid = queue.shift()!;
    tree.push(pid);
    queue.push(...(children.get(pid) ?? []));
  }
  return tree;
}

/** Seconds of CPU (user + system, all threads) used so far by these processes. */
export function cpuSeconds(pids: readonly number[]): number {
  let ticks = 0;
  for (const pid of pids) {
    const fields = readStat(pid);
    // After the name: state(0) ppid(1) ... utime(11) stime(12).
    if (fields) ticks += Number(fields[11]) + Number(fields[12]);
  }
  return ticks / TICKS_PER_SECOND;
}

/**
 * Nanoseconds these processes' live threads have run so far (/proc/PID/task/TID/schedstat): for the
 * few ms per second an idle process uses, where cpuSeconds' 10 ms ticks are too coarse.
 */
export function cpuNanoseconds(pids: readonly number[]): number {
  let ns = 0;
  for (const pid of pids) {
    let threads: string[];
    try {
      threads = readdirSync(`/proc/${pid}/task`);
    } catch {
      continue; // gone
    }
    for (const tid of threads) {
      try {
        ns += Number(readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'latin1').split(' ')[0]);
      } catch {
        // thread gone
      }
    }
  }
  return ns;
}

export interface Memory {
  /** Sum of VmRSS, KiB. */
  rssKiB: number;
  /** Sum of VmHWM (each process's peak RSS), KiB. */
  peakKiB: number;
}

export function memory(pids: readonly number[]): Memory {
  let rssKiB = 0;
  let peakKiB = 0;
  for (const pid of pids) {
    let status: string;
    try {
      status = readFileSync(`/proc/${pid}/status`, 'latin1');
    } catch {
      continue;
    }
    rssKiB += Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0);
    peakKiB += Number(/VmHWM:\s+(\d+)/.exec(status)?.[1] ?? 0);
  }
  return { rssKiB, peakKiB };
}

/**
 * Follows a process tree while a scenario runs: CPU between `start()` and
 * `stop()`, and the highest summed peak RSS seen (workers may come and go).
 */
export class TreeSampler {
  readonly #root: number;
  #pids: number[] = [];
  #cpuStart = 0;
  #peakKiB = 0;
  #timer: NodeJS.Timeout | undefined;

  constructor(root: number) {
    this.#root = root;
  }

  start(): void {
    this.#pids = processTree(this.#root);
    this.#cpuStart = cpuSeconds(this.#pids);
    this.#sample();
    this.#timer = setInterval(() => this.#sample(), 500);
  }

  /** CPU seconds used since start() and the peak summed RSS, KiB. */
  stop(): { cpuSeconds: number; peakKiB: number; processes: number } {
    clearInterval(this.#timer);
    this.#sample();
    return { cpuSeconds: cpuSeconds(this.#pids) - this.#cpuStart, peakKiB: this.#peakKiB, processes: this.#pids.length };
  }

  #sample(): void {
    this.#peakKiB = Math.max(this.#peakKiB, memory(this.#pids).peakKiB);
  }
}

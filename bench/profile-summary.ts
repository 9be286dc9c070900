/**
 * Summarises a V8 .cpuprofile (from `node --cpu-prof`): the functions with
 * the most self time, and self time per source file, as Markdown. Idle time
 * is left out of the percentages: they say where the busy time went.
 * Usable on its own: `node dist/bench/profile-summary.js FILE.cpuprofile`.
 */
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

interface CpuProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
}

interface CpuProfile {
  nodes: CpuProfileNode[];
  samples: number[];
  timeDeltas: number[];
}

function shortUrl(url: string): string {
  if (url === '') return '';
  const ours = /\/dist\/(src|bench)\/(.*)$/.exec(url);
  if (ours) return `${ours[1]}/${ours[2]}`;
  const dep = /node_modules\/(.*)$/.exec(url);
  if (dep) return dep[1]!;
  return url.replace(/^file:\/\//, '');
}

export function summarizeProfile(file: string, top = 20): string {
  const profile = JSON.parse(readFileSync(file, 'utf8')) as CpuProfile;
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const selfUs = new Map<number, number>();
  profile.samples.forEach((id, i) => selfUs.set(id, (selfUs.get(id) ?? 0) + (profile.timeDeltas[i + 1] ?? 0)));
  const byFunction = new Map<string, number>();
  const byFile = new Map<string, number>();
  let busy = 0;
  let idle = 0;
  for (const [id, us] of selfUs) {
    const frame = byId.get(id)!.callFrame;
    if (frame.functionName === '(idle)') {
      idle += us;
      continue;
    }
    busy += us;
    const url = shortUrl(frame.url);
    const name = `${frame.functionName || '(anonymous)'}${url ? ` ${url}:${frame.lineNumber + 1}` : ''}`;
    byFunction.set(name, (byFunction.get(name) ?? 0) + us);
    const fileKey = url || frame.functionName;
    byFile.set(fileKey, (byFile.get(fileKey) ?? 0) + us);
  }
  const pct = (us: number) => ((100 * us) / busy).toFixed(1);
  const table = (title: string, map: Map<string, number>, n: number) => [
    `| ${title} | self ms | % of busy |`,
    '|---|--:|--:|',
    ...[...map.entries()].sort((a, b) => b[1] - a[1]).slice(0, n).map(([k, us]) => `| \`${k.replace(/\|/g, '/')}\` | ${(us / 1000).toFixed(0)} | ${pct(us)} |`),
  ].join('\n');
  return [
    `Busy ${(busy / 1000).toFixed(0)} ms, idle ${(idle / 1000).toFixed(0)} ms. V8 samples the main thread's JavaScript: native work ` +
      'run from I/O callbacks (TLS records, nghttp2, syscalls) shows as `(program)` or even as idle; `perf record -p PID` sees it.',
    '',
    table('Function (self time)', byFunction, top),
    '',
    table('File (self time)', byFile, 15),
  ].join('\n');
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  for (const file of process.argv.slice(2)) process.stdout.write(`${summarizeProfile(file)}\n`);
}

/**
 * A hand-written SVG bar chart, readable at a glance, no dependencies:
 * per scenario, each target's throughput relative to nginx (higher is
 * better) and its CPU per operation relative to nginx (lower is better);
 * below, SSE p99 latency and RSS per idle connection against their goals.
 */
import type { Row } from './report.js';
import { SCENARIOS } from './scenarios.js';
import type { ScenarioId } from './protocol.js';

const WIDTH = 980;
const LABEL_W = 170;
const PANEL_W = 340;
const GAP = 90;
const BAR_H = 11;
const BAR_GAP = 3;
const GROUP_GAP = 14;
const COLORS = ['#8c8c8c', '#2e8b57', '#1f5fbf', '#7fa7e6', '#1b6e43', '#0b3a7a', '#4f7cc4', '#9b59b6', '#e67e22'];

function esc(text: string): string {
  return text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

function text(x: number, y: number, content: string, attrs = ''): string {
  return `<text x="${x.toFixed(1)}" y="${y.toFixed(1)}" ${attrs}>${esc(content)}</text>`;
}

interface Mark {
  readonly value: number;
  readonly label: string;
  readonly dashed?: boolean;
}

interface Panel {
  readonly x: number;
  readonly title: string;
  readonly max: number;
  readonly marks: readonly Mark[];
  readonly value: (r: Row) => number | undefined;
  readonly format: (v: number) => string;
}

function finiteMax(values: (number | undefined)[], floor: number): number {
  return Math.max(floor, ...values.filter((v): v is number => v !== undefined && Number.isFinite(v))) * 1.1;
}

class Canvas {
  readonly parts: string[] = [];
  y = 0;

  constructor(private readonly color: Map<string, string>) {}

  /** One group of bars (one per row) in each panel; returns nothing, advances y. */
  group(label: string, rows: readonly Row[], panels: readonly Panel[]): void {
    const height = rows.length * (BAR_H + BAR_GAP);
    this.parts.push(text(10, this.y + height / 2 + 4, label, 'font-size="11"'));
    for (const p of panels) {
      rows.forEach((r, i) => {
        const v = p.value(r);
        if (v === undefined || !Number.isFinite(v)) return;
        const by = this.y + i * (BAR_H + BAR_GAP);
        const w = Math.max(1, (Math.min(v, p.max) / p.max) * PANEL_W);
        const note = r.errors > 0 ? ` (${r.errors} errors)` : '';
        this.parts.push(
          `<rect x="${p.x}" y="${by}" width="${w.toFixed(1)}" height="${BAR_H}" fill="${this.color.get(r.target)}"><title>${esc(`${r.label}: ${p.format(v)}`)}</title></rect>`,
          text(p.x + w + 3, by + BAR_H - 2, p.format(v) + note, `font-size="9" fill="${note ? '#c0392b' : '#333'}"`),
        );
      });
    }
    this.y += height + GROUP_GAP;
  }

  marks(panels: readonly Panel[], top: number): void {
    for (const p of panels) {
      for (const mark of p.marks) {
        const mx = p.x + (mark.value / p.max) * PANEL_W;
        this.parts.push(
          `<line x1="${mx.toFixed(1)}" y1="${top - 4}" x2="${mx.toFixed(1)}" y2="${this.y - GROUP_GAP + 4}" stroke="#444"${mark.dashed ? ' stroke-dasharray="4 3"' : ''}/>`,
          text(mx + 2, this.y - GROUP_GAP + 14, mark.label, 'font-size="9" fill="#444"'),
        );
      }
    }
    this.y += 18;
  }
}

export function svgChart(rows: readonly Row[], title: string): string {
  const targets = [...new Map(rows.map((r) => [r.target, r.label])).entries()];
  const color = new Map(targets.map(([id], i) => [id, COLORS[i % COLORS.length]!]));
  const nginxOf = (r: Row) => rows.find((n) => n.scenario === r.scenario && n.kind === 'nginx' && n.workers === Math.max(1, r.workers));
  // The direct path has no worker count: it is drawn against the 1-worker nginx, as the limit.
  const throughputRatio = (r: Row) => (r.kind === 'nginx' ? 1 : r.kind === 'direct' ? ratioOf(r.throughput, nginxOf(r)?.throughput) : r.vsNginx);
  const cpuRatio = (r: Row) => (r.kind === 'nginx' ? (r.cpuUsPerOp === undefined ? undefined : 1) : r.cpuVsNginx);
  const ratioOf = (a: number, b: number | undefined) => (b ? a / b : undefined);
  const main = SCENARIOS.filter((s) => s.id !== 'idle' && s.id !== 'sse' && rows.some((r) => r.scenario === s.id));
  const mainRows = rows.filter((r) => main.some((s) => s.id === r.scenario));
  const panels: Panel[] = [
    { x: LABEL_W, title: 'Throughput ÷ nginx (higher is better)', max: finiteMax(mainRows.map(throughputRatio), 1.5), marks: [{ value: 1, label: 'nginx' }], value: throughputRatio, format: (v) => v.toFixed(2) },
    {
      x: LABEL_W + PANEL_W + GAP, title: 'Proxy CPU per operation ÷ nginx (lower is better)', max: finiteMax(mainRows.map(cpuRatio), 2),
      marks: [{ value: 1, label: 'nginx' }, { value: 1.5, label: 'goal 1.5', dashed: true }], value: cpuRatio, format: (v) => v.toFixed(2),
    },
  ];
  const c = new Canvas(color);
  c.parts.push(text(10, 22, title, 'font-size="15" font-weight="bold"'));
  c.y = 42;
  let lx = 10;
  for (const [id, label] of targets) {
    c.parts.push(`<rect x="${lx}" y="${c.y - 9}" width="12" height="10" fill="${color.get(id)}"/>`, text(lx + 16, c.y, label, 'font-size="11"'));
    lx += 28 + label.length * 6.2;
    if (lx > WIDTH - 200) {
      lx = 10;
      c.y += 16;
    }
  }
  c.y += 24;
  for (const p of panels) c.parts.push(text(p.x, c.y, p.title, 'font-size="12" font-weight="bold"'));
  c.y += 10;
  const top = c.y;
  for (const s of main) c.group(s.short, rows.filter((r) => r.scenario === s.id), panels);
  c.marks(panels, top);
  const bottom: { id: ScenarioId; title: string; goal: Mark; value: (r: Row) => number | undefined; label: (rs: readonly Row[]) => string }[] = [
    { id: 'sse', title: 'SSE: p99 ms from upstream write to client receipt (lower is better)', goal: { value: 1, label: 'goal 1 ms', dashed: true }, value: (r) => r.p99Ms, label: () => 'SSE events, p99' },
    {
      id: 'idle', title: 'RSS per idle mTLS connection, KiB (lower is better)', goal: { value: 40, label: 'goal 40 KiB', dashed: true }, value: (r) => r.kibPerConnection,
      label: (rs) => `Idle (${Math.round(rs[0]!.throughput).toLocaleString('en-US')} held)`,
    },
  ];
  for (const b of bottom) {
    const group = rows.filter((r) => r.scenario === b.id && b.value(r) !== undefined);
    if (group.length === 0) continue;
    const panel: Panel = { x: LABEL_W, title: b.title, max: finiteMax(group.map(b.value), b.goal.value * 1.25), marks: [b.goal], value: b.value, format: (v) => v.toFixed(v < 10 ? 2 : 1) };
    c.parts.push(text(panel.x, c.y, b.title, 'font-size="12" font-weight="bold"'));
    c.y += 10;
    const start = c.y;
    c.group(b.label(group), group, [panel]);
    c.marks([panel], start);
  }
  const height = c.y + 30;
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${WIDTH}" height="${height}" viewBox="0 0 ${WIDTH} ${height}" font-family="sans-serif">
<rect width="100%" height="100%" fill="#fff"/>
${c.parts.join('\n')}
</svg>
`;
}

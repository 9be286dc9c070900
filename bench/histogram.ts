/**
 * A latency histogram with 1 % wide buckets on a log scale: fixed memory,
 * mergeable across driver processes, percentiles within 1 %.
 */
const SCALE = 100; // buckets per e-fold: e^(1/100) ~ 1.01

export type HistogramData = [bucket: number, count: number][];

export class Histogram {
  readonly #counts = new Map<number, number>();
  #total = 0;

  /** Records one value in microseconds (values below 1 us count as 1 us). */
  record(us: number): void {
    const bucket = us <= 1 ? 0 : Math.floor(Math.log(us) * SCALE);
    this.#counts.set(bucket, (this.#counts.get(bucket) ?? 0) + 1);
    this.#total += 1;
  }

  get count(): number {
    return this.#total;
  }

  merge(data: HistogramData): void {
    for (const [bucket, count] of data) {
      this.#counts.set(bucket, (this.#counts.get(bucket) ?? 0) + count);
      this.#total += count;
    }
  }

  toJSON(): HistogramData {
    return [...this.#counts.entries()];
  }

  /** The value (us, bucket midpoint) below which `p` (0..1) of the values fall; NaN when empty. */
  percentile(p: number): number {
    if (this.#total === 0) return NaN;
    const rank = Math.max(1, Math.ceil(p * this.#total));
    let seen = 0;
    for (const bucket of [...this.#counts.keys()].sort((a, b) => a - b)) {
      seen += this.#counts.get(bucket)!;
      if (seen >= rank) return Math.exp((bucket + 0.5) / SCALE);
    }
    return NaN;
  }
}

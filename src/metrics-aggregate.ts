/**
 * /metrics with several workers: the primary's registry (certificates,
 * reloads, OVMS) merged with every worker's (the data path). prom-client
 * merges by each metric's `aggregator`: custom metrics sum (requests,
 * open connections), process metrics use their own (event-loop lag
 * averaged). prom-client omits the start time when merging; the primary's is
 * kept, since that is when the service started. Gauges only the primary sets
 * (certificate expiry, ovms_up) have no samples in the workers, so they
 * appear once. Counters and histograms of a worker that exited stay in the
 * sum as last scraped (`monotonicPart`, `sumMonotonic`): Prometheus reads a
 * total that falls as a counter reset and turns it into a spike in rate().
 * Seconds totals are floats, and a worker's exit changes the order they are
 * added in, which may round the same sum one bit lower: each total served is
 * held at or above the one served before it (`ServedTotals`).
 */
import { AggregatorRegistry, type MetricObjectWithValues, type MetricValue, type Registry } from 'prom-client';

export type MetricsJson = MetricObjectWithValues<MetricValue<string>>[];

/** What the admin listener serves at /metrics. */
export interface MetricsSource {
  readonly contentType: string;
  text(): Promise<string>;
}

export function aggregatedMetrics(own: Registry, others: () => Promise<MetricsJson[]>): MetricsSource {
  const served = new ServedTotals();
  return {
    contentType: own.contentType,
    async text() {
      const [mine, theirs] = await Promise.all([own.getMetricsAsJSON(), others()]);
      const merged = AggregatorRegistry.aggregate([mine.map(keepOmitted), ...theirs]);
      served.neverBelowLast(mergedMetrics(merged));
      return merged.metrics();
    },
  };
}

/**
 * Float addition is not associative: with three workers, one request each of 0.1, 0.2 and 0.3 s,
 * the duration total reads 0.6000000000000001, and 0.6 once the first worker has exited and its
 * 0.1 is added last. Prometheus takes any fall as a counter reset and adds the whole total to
 * rate(): a spike in latency (or CPU) panels at each worker exit. So a total never goes below
 * the value served for it before; the true sums only grow, so this holds back rounding alone.
 */
class ServedTotals {
  readonly #last = new Map<string, number>();

  neverBelowLast(metrics: MetricsJson): void {
    for (const metric of monotonicPart(metrics)) {
      // A histogram's values are its buckets, sum and count, each named by metricName.
      for (const value of metric.values as (MetricValue<string> & { metricName?: string })[]) {
        const key = seriesKey(value.metricName ?? metric.name, value.labels);
        value.value = Math.max(value.value, this.#last.get(key) ?? -Infinity);
        this.#last.set(key, value.value);
      }
    }
  }
}

function seriesKey(name: string, labels: MetricValue<string>['labels']): string {
  return JSON.stringify([name, ...Object.entries(labels).sort(([a], [b]) => (a < b ? -1 : 1))]);
}

/**
 * The metrics of a registry AggregatorRegistry.aggregate() built, as data: each comes wrapped with
 * a get() over the same object, so a change to a value here is what metrics() then renders.
 */
function mergedMetrics(registry: Pick<Registry, 'getMetricsAsArray'>): MetricsJson {
  return registry.getMetricsAsArray() as unknown as MetricsJson;
}

/** Merging takes the aggregator of the first registry's copy, and the primary's comes first. */
function keepOmitted(metric: MetricsJson[number]): MetricsJson[number] {
  return metric.aggregator === 'omit' ? { ...metric, aggregator: 'first' } : metric;
}

const MONOTONIC_TYPES = new Set(['counter', 'histogram']);

/** The samples that must never fall: counters and histograms (gauges describe only the living). */
export function monotonicPart(metrics: MetricsJson): MetricsJson {
  return metrics.filter((metric) => MONOTONIC_TYPES.has(String(metric.type)));
}

/**
 * Two snapshots of counters and histograms added sample by sample (same metric,
 * same labels), by prom-client's own merge. Synchronous, unlike a registry's
 * getMetricsAsJSON(): the sum must be in place before the next scrape reads it.
 */
export function sumMonotonic(a: MetricsJson, b: MetricsJson): MetricsJson {
  const merged = mergedMetrics(AggregatorRegistry.aggregate([monotonicPart(a), monotonicPart(b)])) as (MetricsJson[number] & { get?: unknown })[];
  // Each merged metric comes wrapped with a get(); the snapshot is the data alone.
  return merged.map(({ get: _get, ...metric }) => metric);
}

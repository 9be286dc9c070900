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
 */
import { AggregatorRegistry, type MetricObjectWithValues, type MetricValue, type Registry } from 'prom-client';

export type MetricsJson = MetricObjectWithValues<MetricValue<string>>[];

/** What the admin listener serves at /metrics. */
export interface MetricsSource {
  readonly contentType: string;
  text(): Promise<string>;
}

export function aggregatedMetrics(own: Registry, others: () => Promise<MetricsJson[]>): MetricsSource {
  return {
    contentType: own.contentType,
    async text() {
      const [mine, theirs] = await Promise.all([own.getMetricsAsJSON(), others()]);
      return AggregatorRegistry.aggregate([mine.map(keepOmitted), ...theirs]).metrics();
    },
  };
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
  const merged = AggregatorRegistry.aggregate([monotonicPart(a), monotonicPart(b)]).getMetricsAsArray() as unknown as (MetricsJson[number] & { get?: unknown })[];
  // Each merged metric comes wrapped with a get(); the snapshot is the data alone.
  return merged.map(({ get: _get, ...metric }) => metric);
}

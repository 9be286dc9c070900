/**
 * /metrics with several workers: the primary's registry (certificates,
 * reloads, OVMS) merged with every worker's (the data path). prom-client
 * merges by each metric's `aggregator`: custom metrics sum (requests,
 * open connections), process metrics use their own (event-loop lag
 * averaged). prom-client omits the start time when merging; the primary's is
 * kept, since that is when the service started. Gauges only the primary sets
 * (certificate expiry, ovms_up) have no samples in the workers, so they
 * appear once.
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

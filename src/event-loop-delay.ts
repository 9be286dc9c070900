/**
 * The event-loop delay gauges (`nodejs_eventloop_lag_{min,max,mean,stddev,p50,p90,p99}_seconds`),
 * in place of prom-client's default ones of the same names. Those read a perf_hooks histogram that
 * they reset at every scrape, and a scrape that came before its next sample (it takes one each
 * 10 ms: two scrapers a few ms apart, a curl next to Prometheus) found it empty and served a
 * minimum of 9223372036.854776 s (292 years), a maximum of 0 and a mean of NaN, which dashboards
 * and alert rules on the lag took as real. A window without a sample here changes nothing: the
 * gauges keep the last window that had some, and that window goes on until one does.
 */
import { monitorEventLoopDelay, type IntervalHistogram } from 'node:perf_hooks';
import { Gauge, type Registry } from 'prom-client';

interface Statistic {
  readonly name: string;
  readonly help: string;
  /** How the primary merges the workers' values: prom-client's rule for each. */
  readonly aggregator: 'min' | 'max' | 'average';
  /** Nanoseconds. */
  readonly read: (delays: IntervalHistogram) => number;
}

/**
 * With several workers a percentile is the worst process's: averaged with the idle primary's and the other
 * workers', one worker whose loop stalled for half a second at p99 read a third of that with two workers.
 */
const percentile = (p: number): Statistic => ({
  name: `p${p}`,
  help: `The ${p}th percentile of the recorded event loop delays (with workers: the highest process's).`,
  aggregator: 'max',
  read: (delays) => delays.percentile(p),
});

const STATISTICS: readonly Statistic[] = [
  { name: 'min', help: 'The minimum recorded event loop delay.', aggregator: 'min', read: (delays) => delays.min },
  { name: 'max', help: 'The maximum recorded event loop delay.', aggregator: 'max', read: (delays) => delays.max },
  { name: 'mean', help: 'The mean of the recorded event loop delays.', aggregator: 'average', read: (delays) => delays.mean },
  { name: 'stddev', help: 'The standard deviation of the recorded event loop delays.', aggregator: 'average', read: (delays) => delays.stddev },
  percentile(50),
  percentile(90),
  percentile(99),
];

/** Call after collectDefaultMetrics with the same prefix: its gauges of these names give way to these. */
export function replaceEventLoopDelayGauges(registry: Registry, prefix: string): void {
  const delays = monitorEventLoopDelay();
  delays.enable();
  const gauges: Gauge[] = [];
  // The registry reads its metrics in the order they were added: the first one's collect sets every one of them.
  const collectWindow = () => {
    if (delays.count === 0) return;
    STATISTICS.forEach((statistic, i) => gauges[i]!.set(statistic.read(delays) / 1e9));
    delays.reset();
  };
  for (const [i, { name, help, aggregator }] of STATISTICS.entries()) {
    const fullName = `${prefix}nodejs_eventloop_lag_${name}_seconds`;
    registry.removeSingleMetric(fullName);
    gauges.push(new Gauge({ name: fullName, help, aggregator, registers: [registry], ...(i === 0 ? { collect: collectWindow } : {}) }));
  }
}

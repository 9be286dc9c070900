/**
 * What the `proxy` command and the OVMS entrypoint share for operations:
 * the metrics registry and the admin listener with its readiness checks.
 */
import type { Config } from './config.js';
import type { Logger } from './log.js';
import { ProxyMetrics } from './metrics.js';
import type { MetricsSource } from './metrics-aggregate.js';
import { startAdminServer, type AdminServer } from './admin.js';
import { readinessReport, type HealthCheck } from './health.js';
import { hostAndPort } from './addresses.js';
import { logSkipped } from './bind-addresses.js';

export { ProxyMetrics } from './metrics.js';
export { certificatesCheck, listenersCheck, upstreamCheck, upstreamReadiness, readinessReport, type HealthCheck, type HealthReport, type CheckResult, type UpstreamReadiness } from './health.js';

export interface AdminSetup {
  readonly config: Pick<Config, 'admin'>;
  readonly metrics: MetricsSource;
  /** Named readiness checks; /readyz is ready when all pass (e.g. listeners, upstream, certificates). */
  readonly checks: Readonly<Record<string, HealthCheck>>;
  readonly logger: Logger;
}

/** Starts the admin listener when `--mtls_admin_port` is set; undefined otherwise. */
export async function startAdminIfConfigured(setup: AdminSetup): Promise<AdminServer | undefined> {
  const admin = setup.config.admin;
  if (!admin) return undefined;
  const server = await startAdminServer({
    hosts: admin.hosts,
    resolvedFrom: admin.resolvedFrom,
    port: admin.port,
    metrics: setup.metrics,
    health: () => readinessReport(setup.checks),
    logger: setup.logger,
  });
  for (const skipped of server.skipped) logSkipped(setup.logger, 'admin', 'mtls_admin_bind_address', server.port, skipped);
  setup.logger.info({ event: 'listening', listener: 'admin', addresses: server.addresses.map((a) => hostAndPort(a.address, a.port)) }, 'admin listener ready (/metrics /healthz /readyz)');
  return server;
}

/**
 * Wraps the model-server readiness check so each /readyz probe also sets
 * `ovms_mtls_ovms_up` (proxy mode has no child process to watch).
 */
export function updatingOvmsUp(metrics: ProxyMetrics, check: HealthCheck): HealthCheck {
  return async () => {
    const result = await check();
    metrics.setOvmsUp(result.ok);
    return result;
  };
}

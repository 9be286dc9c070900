/**
 * What both serving commands (`proxy` and the OVMS entrypoint) run beside
 * the listeners: metrics, the admin listener and certificate hot reload.
 */
import type { X509Certificate } from 'node:crypto';
import type { Config } from '../config.js';
import type { Logger } from '../log.js';
import type { RunningProxy } from '../proxy.js';
import type { TlsMaterial } from '../tls-material.js';
import { NOOP_OBSERVER, type ProxyObserver } from '../observer.js';
import type { AdminServer } from '../admin.js';
import { TlsReloader } from '../tls-reload.js';
import { javaCaNamesMessage } from '../ca-names.js';
import { nameOf, securityLevelWeakness, unanchoredCaMessage, unanchoredCas, weakClientCaMessage } from '../tls-checks.js';
import type { WorkerPool } from '../workers.js';
import { aggregatedMetrics, type MetricsSource } from '../metrics-aggregate.js';
import { ProxyMetrics, certificatesCheck, listenersCheck, startAdminIfConfigured, type HealthCheck } from '../operations.js';

export interface ServingOperationsOptions {
  readonly config: Config;
  readonly material: TlsMaterial;
  readonly logger: Logger;
  /** Is the model server ready (proxy mode: it answers; entrypoint: the OVMS child is ready)? */
  readonly upstreamCheck: (metrics: ProxyMetrics) => HealthCheck;
  /** --mtls_workers > 1: /metrics merges the workers' numbers, /readyz asks the pool. */
  readonly workers?: WorkerPool | undefined;
  /**
   * Proxy mode: ovms_up comes from the upstream check, so each scrape runs it
   * too; else it stays 0 wherever nothing probes /readyz (Prometheus alone).
   */
  readonly scrapeChecksUpstream?: boolean;
}

export class ServingOperations {
  readonly metrics: ProxyMetrics;
  readonly #options: ServingOperationsOptions;
  #material: TlsMaterial;
  #proxy: RunningProxy | undefined;
  #admin: AdminServer | undefined;
  #reloader: TlsReloader | undefined;

  private constructor(options: ServingOperationsOptions) {
    this.#options = options;
    this.metrics = new ProxyMetrics({ processMetrics: options.config.admin !== undefined });
    this.#material = options.material;
    this.metrics.setCertificates(options.material);
    this.metrics.materialLoaded();
    this.#warnCasRefusingClients(options.material);
  }

  /** A bundle that refuses every client of one of its CAs loads and serves: said at start and at each reload, once per process that owns the reload. */
  #warnCasRefusingClients(material: TlsMaterial): void {
    const subject = (ca: X509Certificate) => nameOf(ca, 'subject').replace(/\n/g, ',');
    const javaRefuses = javaCaNamesMessage(material.clientCas, material.files.clientCa);
    if (javaRefuses) this.#options.logger.warn({ event: 'client_ca_names_large' }, javaRefuses);
    for (const ca of unanchoredCas(material.clientCas)) {
      this.#options.logger.warn({ event: 'client_ca_unanchored', subject: subject(ca) }, unanchoredCaMessage(ca, material.files.clientCa));
    }
    for (const ca of material.clientCas) {
      const weakness = securityLevelWeakness(ca);
      if (weakness) this.#options.logger.warn({ event: 'client_ca_weak', subject: subject(ca) }, weakClientCaMessage(ca, material.files.clientCa, weakness));
    }
  }

  /** What the data path reports to: the metrics, or nothing when no admin port would ever serve them. */
  get requestObserver(): ProxyObserver {
    return this.#options.config.admin ? this.metrics : NOOP_OBSERVER;
  }

  /** Admin first: /healthz answers while the public listeners bind, /readyz says they are not up yet. */
  static async start(options: ServingOperationsOptions): Promise<ServingOperations> {
    const ops = new ServingOperations(options);
    const { workers } = options;
    const upstream = options.upstreamCheck(ops.metrics);
    const metrics = workers ? aggregatedMetrics(ops.metrics.registry, () => workers.collectMetrics()) : ops.metrics;
    ops.#admin = await startAdminIfConfigured({
      config: options.config,
      metrics: options.scrapeChecksUpstream ? checkingBeforeScrape(metrics, upstream) : metrics,
      logger: options.logger,
      checks: {
        listeners: workers ? () => workers.check() : listenersCheck(() => ops.#proxy),
        upstream,
        certificates: certificatesCheck(() => ops.#material),
      },
    });
    return ops;
  }

  /** Starts hot reload (directory watch) for the running proxy. */
  attach(proxy: RunningProxy): void {
    const { config, logger } = this.#options;
    this.#proxy = proxy;
    this.#reloader = new TlsReloader({
      files: config.tls,
      current: this.#material,
      proxy,
      logger,
      revokedGraceMs: config.shutdownTimeoutMs,
      onReload: (outcome) => {
        this.metrics.reloaded(outcome);
        if (!outcome.ok || !outcome.changed) return;
        this.#material = outcome.material;
        this.metrics.setCertificates(outcome.material);
        this.#warnCasRefusingClients(outcome.material);
      },
    });
    this.#reloader.watch();
  }

  /** SIGHUP. */
  reload(): void {
    void this.#reloader?.reload('signal');
  }

  /** Stops watching now; the admin listener closes last so probes see the drain. */
  stopWatching(): void {
    this.#reloader?.close();
  }

  async close(): Promise<void> {
    this.stopWatching();
    await this.#admin?.close();
  }
}

function checkingBeforeScrape(metrics: MetricsSource, check: HealthCheck): MetricsSource {
  return {
    contentType: metrics.contentType,
    text: async () => {
      await check();
      return metrics.text();
    },
  };
}

/**
 * The package's entry (package.json `main`, `types`, `exports`): what `ovms-mtls proxy` does, from
 * code. The configuration comes from the command line's own option names through the same
 * checks and defaults, so a program gets what the CLI would:
 *
 *   const options = proxyConfigFromOptions({ rest_port: '8443', mtls_rest_upstream: '127.0.0.1:8000', mtls_cert: 'server.pem', ... });
 *   const config = { ...options, ...(await resolveListenAddresses(options)) };
 *   const proxy = await startProxy({ config, material: loadTlsMaterialSync(config.tls), logger: createLogger({ level: config.logLevel }) });
 *   ...
 *   await proxy.shutdown(config.shutdownTimeoutMs);
 *
 * What they throw or reject with for bad input is an OvmsMtlsError (ConfigError, TlsMaterialError,
 * ListenError) whose one-line `message` is what the command prints.
 */
export { startProxy, type ProxyOptions, type RunningProxy } from './proxy.js';
export { libraryProxyConfig as proxyConfigFromOptions } from './proxy-options.js';
export type { RawOptions } from './options.js';
export type { Config, TlsFiles } from './config.js';
export { resolveListenAddresses } from './bind-addresses.js';
// loadTlsMaterial reads without blocking, for a reload while the proxy serves (reloadTls).
export { loadTlsMaterialSync, loadTlsMaterial, type TlsMaterial } from './tls-material.js';
// What `ovms-mtls proxy` does on SIGHUP and file changes: reloadTls alone leaves revoked clients' live connections open.
export { TlsReloader, type TlsReloaderOptions, type ReloadOutcome, type ReloadTrigger } from './tls-reload.js';
export { createLogger, type Logger, type LoggerOptions } from './log.js';
export { OvmsMtlsError, ConfigError, TlsMaterialError, ListenError } from './errors.js';
// A program's own metrics or audit trail: what the data path reports (startProxy's `observer`), each event once.
export { NOOP_OBSERVER, type ProxyObserver, type AccessRecord, type RelayRecord, type ClientRef, type UnseenResets, type H2SessionFailure, type UnresponsiveClient, type ListenerName } from './observer.js';
export type { Refusal } from './client-identity.js';

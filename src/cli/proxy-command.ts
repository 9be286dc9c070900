import { ENVIRONMENT_HELP, envVarName, type RawOptions } from '../options.js';
import type { Logger } from 'pino';
import type { Config } from '../config.js';
import { ENTRYPOINT_ONLY, PROXY_OPTIONS, entrypointOnlyError, proxyConfigFromOptions } from '../proxy-options.js';
import { resolveListenAddresses } from '../bind-addresses.js';
import { createLogger } from '../log.js';
import { loadTlsMaterialSync } from '../tls-material.js';
import { startProxy, type RunningProxy } from '../proxy.js';
import { updatingOvmsUp, upstreamCheck } from '../operations.js';
import { ServingOperations } from './serving-operations.js';
import { WorkerPool } from '../workers.js';
import { collectOptions, parseCommandLine } from './options-parser.js';
import { waitForStopSignal, warnServiceLinks } from './lifecycle.js';
import { PROXY_FATAL_EXIT_CODE } from './entrypoint-lifecycle.js';

/** An entrypoint option given to `proxy`: one line saying so, rather than yargs' "unknown option". */
function refuseEntrypointOptions(argv: readonly string[]): void {
  for (const arg of argv) {
    const name = /^--(mtls_[a-z_]+)(=|$)/.exec(arg)?.[1];
    if (name !== undefined && ENTRYPOINT_ONLY.has(name)) throw entrypointOnlyError(name);
  }
}

/**
 * An entrypoint variable in the environment, where an env file shared with the OVMS container
 * may put it: `proxy` goes on without it, but says so. Silently, OVMS_MTLS_USER read as a
 * privilege drop while the proxy went on as the user that started it.
 */
function warnEntrypointOnlyVariables(env: NodeJS.ProcessEnv, logger: Logger): void {
  for (const name of ENTRYPOINT_ONLY) {
    const variable = envVarName(name);
    if (env[variable] === undefined) continue;
    const consequence = name === 'mtls_user' ? `; it runs as the user that started it (uid ${process.getuid?.() ?? '?'})` : '';
    logger.warn({ event: 'variable_ignored', variable }, `${variable} applies to the OVMS entrypoint only: \`ovms-mtls proxy\` ignores it${consequence}`);
  }
}

/**
 * An upstream given for a protocol with no public port (`--mtls_rest_upstream` without `--rest_port`,
 * or a variable from an env file shared by several deployments): nothing listens for that protocol,
 * which the user may not have meant, and the proxy said nothing.
 */
function warnUpstreamsWithoutListener(raw: RawOptions, config: Config, logger: Logger): void {
  const unused = [['mtls_grpc_upstream', 'port', config.grpc], ['mtls_rest_upstream', 'rest_port', config.rest]] as const;
  for (const [upstream, port, listener] of unused) {
    if (listener !== undefined || raw[upstream] === undefined) continue;
    logger.warn({ event: 'option_ignored', option: upstream }, `--${upstream} is set, but --${port} is not: nothing listens for it, so it is not used (give --${port} to serve it)`);
  }
}

export const PROXY_USAGE = `ovms-mtls proxy --port 9443 --mtls_grpc_upstream 127.0.0.1:9000 \\
    --rest_port 8443 --mtls_rest_upstream 127.0.0.1:8000 \\
    --mtls_cert server.pem --mtls_key server.key --mtls_client_ca client_cert_ca.pem [--mtls_crl client_cert_ca.crl]

Terminates mutual TLS in front of a model server that runs elsewhere.
${ENVIRONMENT_HELP}`;

/** `ovms-mtls proxy ...`: runs until SIGTERM/SIGINT, then drains and returns 0; 70 when the proxy can serve no more. */
export async function runProxyCommand(argv: readonly string[], env: NodeJS.ProcessEnv): Promise<number> {
  refuseEntrypointOptions(argv);
  const parsed = await parseCommandLine(argv, PROXY_OPTIONS, PROXY_USAGE, 'proxy');
  const raw = collectOptions(parsed, PROXY_OPTIONS, env);
  const options = proxyConfigFromOptions(raw);
  // Host names become their addresses here, once: the listeners, the workers and the admin port bind addresses.
  const config = { ...options, ...(await resolveListenAddresses(options)) };
  const logger = createLogger({ level: config.logLevel });
  warnEntrypointOnlyVariables(env, logger);
  warnServiceLinks(env, argv, logger);
  warnUpstreamsWithoutListener(raw, config, logger);
  const material = loadTlsMaterialSync(config.tls);
  // --mtls_workers > 1: forked workers serve; this process keeps the admin port, the reload watch and the signals.
  const workers = config.workers > 1 ? new WorkerPool({ config, material, logger }) : undefined;
  const ops = await ServingOperations.start({ config, material, logger, upstreamCheck: (metrics) => updatingOvmsUp(metrics, upstreamCheck(config)), workers, scrapeChecksUpstream: true });
  // Before the listeners: a worker logs `listening` before the last one is up, and a SIGTERM then must drain, not kill.
  const stop = waitForStopSignal(logger);
  let proxy: RunningProxy;
  try {
    proxy = workers ? await workers.start(stop.signal) : await startProxy({ config, material, logger, observer: ops.requestObserver });
  } catch (err) {
    stop.dispose();
    await ops.close();
    throw err;
  }
  ops.attach(proxy);
  stop.onReload(() => ops.reload());
  const failure = await Promise.race([stop.signal.then(() => undefined), failureOf(proxy)]);
  ops.stopWatching();
  if (failure) {
    stop.dispose();
    logger.fatal({ event: 'proxy_failed', reason: failure.message }, `proxy failed: ${failure.message}`);
  }
  await proxy.shutdown(failure ? 0 : config.shutdownTimeoutMs);
  await ops.close();
  logger.info({ event: 'stopped', ...(failure ? { exitCode: PROXY_FATAL_EXIT_CODE } : {}) }, 'stopped');
  return failure ? PROXY_FATAL_EXIT_CODE : 0;
}

/** Resolves with the error that ends the run if the proxy can serve no more (never, for a single process). */
function failureOf(proxy: RunningProxy): Promise<Error> {
  return proxy.failed?.catch((err: Error) => err) ?? new Promise<never>(() => undefined);
}

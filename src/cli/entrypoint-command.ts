/**
 * `ovms-mtls [OVMS options]`: a drop-in for the `ovms` command. Binds the
 * public mTLS listeners (as root if started so), starts OVMS on loopback
 * ports behind them, drops privileges, and lives exactly as long as OVMS.
 */
import type { Config, PublicListenerSpec, TlsFiles } from '../config.js';
import { ChildProcessError, ConfigError } from '../errors.js';
import { ovmsBinaryProblem } from '../ovms-binary.js';
import { createLogger, type Logger } from '../log.js';
import { loadTlsMaterialSync, unreadableTlsFiles } from '../tls-material.js';
import { startProxy, type RunningProxy } from '../proxy.js';
import { combineObservers, type ProxyObserver } from '../observer.js';
import { updatingOvmsUp, upstreamReadiness, type CheckResult, type HealthCheck, type ProxyMetrics, type UpstreamReadiness } from '../operations.js';
import { ServingOperations } from './serving-operations.js';
import { WorkerPool } from '../workers.js';
import { resolveListenAddresses } from '../bind-addresses.js';
import { productVersion } from '../version.js';
import { splitOvmsArgv, ovmsServeArgv, type SplitOvmsArgv } from '../ovms-args.js';
import { entrypointSettings, ovmsBinary, ovmsUser, type EntrypointSettings, type OvmsBinary } from '../entrypoint-config.js';
import { exitCodeOf, findSetpriv, ovmsIdentity, runToCompletion, spawnCommand } from '../ovms-child.js';
import { OvmsSupervisor, type HangWatchSettings } from '../ovms-supervisor.js';
import { ovmsLivenessCheck, ovmsReadinessProbe, processStopped } from '../ovms-readiness.js';
import { hangCheckPeriodMs } from '../ovms-watchdog.js';
import { LoopbackUpstreams } from '../ports.js';
import { assertCanSwitchUsers, dropPrivileges, isRoot, ovmsEnvironment, planPrivileges, usersNotTaken, type PrivilegePlan, type UserAccount, type UserOption } from '../privileges.js';
import { DEFAULTS } from '../config.js';
import { helpText } from './help.js';
import { logSupervisorEvents, ovmsStopShareMs, runUntilDone, shutdownBudget } from './entrypoint-lifecycle.js';
import { waitForStopSignal, warnServiceLinks } from './lifecycle.js';
import { releaseStopSignals } from '../startup-signals.js';
import type { Io } from './main.js';

/** `runAs`: the user OVMS will run as (the plan's), whose permissions count rather than ours. */
function assertExecutable(binary: OvmsBinary, runAs: UserAccount | undefined): void {
  const problem = ovmsBinaryProblem(binary, runAs && ovmsIdentity(runAs, findSetpriv()));
  if (problem !== undefined) throw new ChildProcessError(`--mtls_ovms_binary: ${binary.path} ${problem}`);
}

export async function runEntrypointCommand(argv: readonly string[], io: Io): Promise<number> {
  const split = splitOvmsArgv(argv, io.env);
  // Only serving stops on SIGTERM/SIGINT; the other modes end by one, also one that came while the program loaded.
  if (split.mode.kind !== 'serve') releaseStopSignals();
  switch (split.mode.kind) {
    case 'help':
      io.stdout.write(helpText());
      return 0;
    case 'version':
      return runVersion(split, io);
    case 'ovms-help':
      return runOneShot(split, io, ['--help'], {});
    case 'direct':
      return runOneShot(split, io, split.passthrough, oneShotPrivileges(split, io));
    case 'serve': {
      const settings = entrypointSettings(split, io.env);
      const logger = createLogger({ level: settings.common.logLevel });
      warnServiceLinks(io.env, argv, logger);
      const stop = waitForStopSignal(logger);
      let running: Serving;
      try {
        ({ running } = await startServing(settings, { logger, stopRequested: stop.signal }));
      } catch (err) {
        stop.dispose();
        throw err;
      }
      stop.onReload(() => running.operations.reload());
      try {
        return await runUntilDone({ ...running, logger, stop });
      } finally {
        await running.operations.close();
      }
    }
  }
}

/**
 * Our version, then OVMS's own (drop-in users expect it), with OVMS's exit code. An --mtls_ovms_binary that
 * cannot run is refused, as in every mode. Without the image's OVMS (ovms-mtls run outside its container)
 * ours is still of use: exit 0, with a line saying why OVMS's is missing, which said nothing.
 */
async function runVersion(split: SplitOvmsArgv, io: Io): Promise<number> {
  const binary = ovmsBinary(split, io.env);
  if (binary.given) assertExecutable(binary, undefined);
  io.stdout.write(`ovms-mtls ${productVersion()}\n`);
  const problem = ovmsBinaryProblem(binary);
  if (problem !== undefined) {
    io.stderr.write(`ovms-mtls: OVMS's version is not shown: ${binary.path} ${problem}\n`);
    return 0;
  }
  return exitCodeOf(await runToCompletion(spawnCommand({ binary: binary.path, args: ['--version'], setpriv: findSetpriv() })));
}

/** --pull, --list_models ... write model files: as root they run as the OVMS user, like serving does. */
function oneShotPrivileges(split: SplitOvmsArgv, io: Io): PrivilegePlan {
  const plan = planPrivileges({ ovmsUser: ovmsUser(split, io.env), proxyUser: 'root', root: isRoot() });
  assertCanSwitchUsers(plan);
  return plan;
}

/** A non-serving OVMS invocation: run OVMS with these arguments and exit with its code; nothing listens. */
async function runOneShot(split: SplitOvmsArgv, io: Io, args: readonly string[], plan: PrivilegePlan): Promise<number> {
  const binary = ovmsBinary(split, io.env);
  assertExecutable(binary, plan.ovms);
  const status = await runToCompletion(spawnCommand({ binary: binary.path, args, runAs: plan.ovms, setpriv: findSetpriv(), env: ovmsEnvironment(plan.ovms) }));
  return exitCodeOf(status);
}

/**
 * After the proxy dropped to its user, it can signal OVMS (SIGTERM, SIGKILL after the timeout)
 * and spawn it again only as that same user: the kernel refuses signals to another uid.
 */
function sameUserAfterDrop(plan: PrivilegePlan): boolean {
  if (!plan.proxy) return true;
  return plan.ovms !== undefined && plan.ovms.uid === plan.proxy.uid;
}

/** Otherwise SIGTERM would fail with EPERM, OVMS would pass for exited (127) and outlive us (pdeathsig is refused too). */
function checkUsersCompatible(settings: EntrypointSettings, plan: PrivilegePlan): void {
  if (!sameUserAfterDrop(plan)) {
    throw new ConfigError(
      `--mtls_user: OVMS runs as '${settings.ovmsUser}' but the proxy would drop to '${settings.proxyUser}' and could then neither stop OVMS nor start it again (use the same user for --mtls_ovms_user and --mtls_user, or --mtls_user root)`,
    );
  }
}

/**
 * Started as anybody but root there is nothing to switch from: a user option naming someone else is
 * passed over, and says so, as `proxy` does of --mtls_user. Silently, OVMS ran as the starting uid
 * where the option asked for another.
 */
function warnUsersNotTaken(given: Partial<Record<UserOption, string>>, logger: Logger): void {
  const uid = process.getuid?.();
  if (uid === undefined) return;
  for (const flag of usersNotTaken(given, uid)) {
    logger.warn(
      { event: 'option_ignored', option: flag },
      `--${flag} '${given[flag]}' is not taken: the entrypoint started as uid ${uid}, not root, so OVMS and the proxy both run as uid ${uid} (start it as root for it to switch users, or leave the option out)`,
    );
  }
}

function listenerConfig(spec: PublicListenerSpec | undefined, upstreams: LoopbackUpstreams, name: 'grpc' | 'rest'): Config['grpc'] {
  if (!spec) return undefined;
  return { hosts: spec.hosts, resolvedFrom: spec.resolvedFrom, port: spec.port ?? 0, upstream: upstreams.upstream(name) };
}

export interface ServingOptions {
  /** Where the product's JSON lines go; stdout by default. */
  readonly logger?: Logger;
  /** Extra observer for the proxy (metrics); single-process only (--mtls_workers 1). */
  readonly observer?: ProxyObserver;
  /** The first SIGTERM/SIGINT: workers still starting are not waited for once it came. */
  readonly stopRequested?: Promise<unknown>;
}

export interface Serving {
  readonly proxy: RunningProxy;
  /** Metrics, admin listener, certificate hot reload. */
  readonly operations: ServingOperations;
  readonly supervisor: OvmsSupervisor;
  readonly shutdownTimeoutMs: number;
}

/**
 * Everything up to "OVMS is starting": resolve users, read the keys, bind
 * the public ports (OVMS is never started when that fails), spawn OVMS,
 * then drop the proxy's privileges.
 */
export async function startServing(settings: EntrypointSettings, options: ServingOptions = {}): Promise<{ running: Serving; logger: Logger }> {
  const logger = options.logger ?? createLogger({ level: settings.common.logLevel });
  const stop = { requested: false };
  void options.stopRequested?.then(() => (stop.requested = true));
  const plan = planPrivileges({ ovmsUser: settings.ovmsUser, proxyUser: settings.proxyUser, root: isRoot() });
  if (!isRoot()) warnUsersNotTaken(settings.usersGiven, logger);
  checkUsersCompatible(settings, plan);
  assertCanSwitchUsers(plan);
  assertExecutable(settings.binary, plan.ovms);
  // Host names become their addresses here, once: the listeners, the workers and the admin port bind addresses.
  const binds = await resolveListenAddresses({ ...settings.listeners, admin: settings.common.admin });
  const material = loadTlsMaterialSync(settings.common.tls);
  const ours = [binds.grpc?.port, binds.rest?.port, binds.admin?.port].filter((port): port is number => port !== undefined && port > 0);
  const upstreams = new LoopbackUpstreams({ grpc: binds.grpc !== undefined, rest: binds.rest !== undefined }, undefined, ours);
  await upstreams.choose();
  const config: Config = {
    ...settings.common,
    admin: binds.admin,
    grpc: listenerConfig(binds.grpc, upstreams, 'grpc'),
    rest: listenerConfig(binds.rest, upstreams, 'rest'),
  };
  const holder: { supervisor?: OvmsSupervisor } = {};
  const notReady = () => {
    const state = holder.supervisor?.state();
    if (state?.ready) return undefined;
    return state?.up ? 'OVMS is starting' : 'OVMS is not running';
  };
  // --mtls_workers > 1: forked workers serve and drop privileges themselves; OVMS stays this process's child.
  const drainMs = shutdownBudget(config.shutdownTimeoutMs).drainMs;
  const workers = config.workers > 1 ? new WorkerPool({ config, material, logger, dropTo: plan.proxy, notReady, ports: () => upstreams.current(), drainMs }) : undefined;
  // ovms_up means what /readyz's upstream check says (models loaded), as in proxy mode, so each scrape runs it.
  const ovmsReady = (metrics: ProxyMetrics) => updatingOvmsUp(metrics, ovmsReadiness(() => holder.supervisor, upstreamReadiness(config)));
  const operations = await ServingOperations.start({ config, material, logger, upstreamCheck: ovmsReady, workers, scrapeChecksUpstream: true });
  const observer = options.observer ? combineObservers(operations.requestObserver, options.observer) : operations.requestObserver;
  let proxy: RunningProxy;
  try {
    proxy = workers ? await workers.start(options.stopRequested) : await startProxy({ config, material, logger, notReady: { grpc: notReady, rest: notReady }, observer });
  } catch (err) {
    await operations.close();
    throw err;
  }
  const supervisor = createSupervisor(settings, plan, upstreams, config, logger);
  holder.supervisor = supervisor;
  logSupervisorEvents(supervisor, logger, () => upstreams.current());
  countSupervisorEvents(supervisor, operations.metrics);
  if (workers) tellWorkersAboutOvms(supervisor, workers);
  // Asked to stop while the listeners started (workers take a while to fork): OVMS would start
  // loading its models only to be signalled at once, sitting out its share of the shutdown timeout
  // until SIGKILL (exit 137) where it does not act on a signal during its load.
  if (!stop.requested) supervisor.start();
  workers?.upstreamChanged();
  if (plan.proxy) {
    dropPrivileges(plan.proxy);
    logger.info({ event: 'privileges_dropped', user: plan.proxy.name, uid: plan.proxy.uid, gid: plan.proxy.gid }, `proxy now runs as ${plan.proxy.name}`);
    warnUnreadableAfterDrop(material.files, plan.proxy.name, logger);
  }
  // After the drop, so reloads read the files as the proxy's user (see README).
  operations.attach(proxy);
  return { running: { proxy, supervisor, operations, shutdownTimeoutMs: settings.common.shutdownTimeoutMs }, logger };
}

/** Reloads read the files as the user dropped to: say at start what the first rotation would otherwise find out. */
function warnUnreadableAfterDrop(files: TlsFiles, user: string, logger: Logger): void {
  for (const reason of unreadableTlsFiles(files)) {
    logger.warn(
      { event: 'tls_files_unreadable', user, reason },
      `reloads read the certificates as ${user}, and ${reason}: every reload (a certificate rotation, SIGHUP) fails until it can`,
    );
  }
}

/**
 * OVMS opens its ports (and answers /v2/health/live) before it loads the
 * models, which can take minutes: the supervisor's "ready" only means calls
 * can be forwarded. /readyz asks OVMS's own readiness on top, so that an
 * orchestrator sends traffic once the models are loaded.
 */
function ovmsReadiness(supervisor: () => OvmsSupervisor | undefined, modelsLoaded: () => Promise<UpstreamReadiness>): HealthCheck {
  return async (): Promise<CheckResult> => {
    const state = supervisor()?.state();
    if (!state?.up) return { ok: false, detail: 'OVMS is not running' };
    if (!state.ready) return { ok: false, detail: await startingDetail(state.pid, modelsLoaded) };
    const loaded = await modelsLoaded();
    if (loaded.ok) return { ok: true, detail: `OVMS ready (pid ${state.pid})` };
    return { ok: false, detail: `OVMS (pid ${state.pid}) ${await notReadyBecause(state.pid, loaded)}: ${loaded.detail}` };
  };
}

/**
 * A port that answers in the other protocol is a server there, just not the one meant there: no wait
 * makes it right. The program run as OVMS put its gRPC and REST servers on each other's ports.
 */
const ANSWERS_IN_OTHER_PROTOCOL =
  "answers, but a port speaks the other protocol, which no wait will change (its gRPC and REST servers on each other's ports? the program run as OVMS, --mtls_ovms_binary, must serve gRPC on --port and REST on --rest_port)";

/**
 * Not ready in the supervisor's eyes: its ports not open yet, or a REST port that answers in HTTP/2 only
 * (its probe wants /v2/health/live answered 200), which would otherwise read "starting" for good.
 */
async function startingDetail(pid: number | undefined, modelsLoaded: () => Promise<UpstreamReadiness>): Promise<string> {
  const seen = await modelsLoaded();
  return seen.otherProtocol ? `OVMS (pid ${pid}) ${ANSWERS_IN_OTHER_PROTOCOL}: ${seen.detail}` : 'OVMS is starting';
}

/**
 * An OVMS that hangs or is stopped is not "loading models", nor is one that answers in the other protocol:
 * the operator is told which it is. Without --mtls_ovms_hang_timeout a hung one stays so (nothing restarts it);
 * with it, the watchdog ends it once the same check has found it so for the whole timeout.
 */
async function notReadyBecause(pid: number | undefined, loaded: UpstreamReadiness): Promise<string> {
  if (loaded.otherProtocol) return ANSWERS_IN_OTHER_PROTOCOL;
  if (!loaded.unanswered) return 'answers but is not ready yet (loading models?)';
  if (pid !== undefined && (await processStopped(pid))) return 'is stopped (SIGSTOP or SIGTSTP; it answers nothing until SIGCONT)';
  return 'does not answer (hung?)';
}

/** Workers answer 503/UNAVAILABLE while OVMS is not ready, and follow its loopback ports: tell them every change. */
function tellWorkersAboutOvms(supervisor: OvmsSupervisor, workers: WorkerPool): void {
  for (const event of ['spawn', 'ready', 'exit', 'retrying', 'restarting'] as const) supervisor.on(event, () => workers.upstreamChanged());
}

/** ovms_up turns 1 only through the readiness check: OVMS's ports open (the supervisor's 'ready') before its models load. */
function countSupervisorEvents(supervisor: OvmsSupervisor, metrics: ProxyMetrics): void {
  supervisor.on('exit', () => metrics.setOvmsUp(false));
  // Counted when OVMS starts again, not when the restart is scheduled: a stop during the backoff cancels it.
  supervisor.on('restarted', () => metrics.ovmsRestarted());
}

function createSupervisor(settings: EntrypointSettings, plan: PrivilegePlan, upstreams: LoopbackUpstreams, config: Config, logger: Logger): OvmsSupervisor {
  const setpriv = findSetpriv();
  if (!setpriv) logger.warn({ event: 'no_setpriv' }, 'setpriv not found: OVMS would outlive ovms-mtls if ovms-mtls were killed with SIGKILL');
  let portRetries: number = DEFAULTS.ovms.portRetries;
  // Once, as root: restarts after the proxy's drop keep it.
  const env = ovmsEnvironment(plan.ovms);
  return new OvmsSupervisor({
    // As root at the first spawn; after the drop we already are the OVMS user (see checkUsersCompatible).
    command: () => spawnCommand({ binary: settings.binary.path, args: ovmsServeArgv(settings.passthrough, upstreams.current(), { sharedGrpcConnection: settings.common.grpcMode === 'terminate' }), runAs: isRoot() ? plan.ovms : undefined, setpriv, env }),
    probe: ovmsReadinessProbe(upstreams.host, () => upstreams.current()),
    restart: settings.restart,
    ...(settings.hangTimeoutMs > 0 ? { hangWatch: hangWatchSettings(settings, config) } : {}),
    retryStart: async () => {
      if (portRetries <= 0) return false;
      const taken = await upstreams.takenPort();
      if (taken === undefined) return false;
      portRetries -= 1;
      logger.warn({ event: 'loopback_port_taken', port: taken }, `loopback port ${taken} was taken before OVMS could bind it: starting OVMS again on new ports`);
      await upstreams.choose();
      return true;
    },
  });
}

/** Each check may take until the next is due; a hung OVMS gets the same time to exit after SIGTERM as at shutdown. */
function hangWatchSettings(settings: EntrypointSettings, config: Config): HangWatchSettings {
  const timeoutMs = settings.hangTimeoutMs;
  return { timeoutMs, check: ovmsLivenessCheck(config, hangCheckPeriodMs(timeoutMs)), stopGraceMs: ovmsStopShareMs(settings.common.shutdownTimeoutMs) };
}

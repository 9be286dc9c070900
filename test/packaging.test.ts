/**
 * The packaging files cannot be run here (no Docker engine, no cluster), so
 * this checks what can go stale without anyone noticing: they parse, every
 * path they name exists, every ovms-mtls flag they pass is one the CLI knows,
 * and the pieces agree with each other (ports, names, labels).
 */
import { createRequire } from 'node:module';
import { test, describe, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, readFileSync, readdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { once } from 'node:events';
import { createServer as createTcpServer, type AddressInfo } from 'node:net';
import { parse, parseAllDocuments } from 'yaml';
import { ALL_OPTIONS, envVarName, optionSpec, optionsFromEnv } from '../src/options.js';
import type { LoggerOptions, RawOptions } from '../src/index.js';
import { DEFAULTS, parseAllowList } from '../src/config.js';
import { PROXY_OPTIONS, proxyConfigFromOptions } from '../src/proxy-options.js';
import { collectOptions, parseCommandLine } from '../src/cli/options-parser.js';
import { PROXY_USAGE } from '../src/cli/proxy-command.js';
import { DEFAULT_PROBE_TIMEOUT_S, PROBE_OPTIONS, PROBE_USAGE } from '../src/cli/probe-command.js';
import { entrypointSettings } from '../src/entrypoint-config.js';
import { splitOvmsArgv, UNCAPPED_OVMS_STREAMS } from '../src/ovms-args.js';
import { UPSTREAM_CHECK_TIMEOUT_MS } from '../src/health.js';
import { createCrl } from '../src/x509.js';
import { createTestPki } from './helpers/pki.js';
import { https1, LogCapture } from './helpers/harness.js';
import { closedByReload } from './helpers/reload.js';
import { eventually } from './helpers/ops.js';
import { startModelServer } from '../src/demo/model-server.js';
import { runCli, runCommand } from './helpers/cli.js';
import { freeLoopbackPorts } from '../src/ports.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const read = (path: string) => readFileSync(join(ROOT, path), 'utf8');

type Yaml = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

/** A `proxy` command line must get through the real parser and config validation. */
async function assertValidProxyArgs(argv: string[]): Promise<void> {
  const parsed = await parseCommandLine(argv, PROXY_OPTIONS, PROXY_USAGE, 'proxy');
  proxyConfigFromOptions(collectOptions(parsed, PROXY_OPTIONS, {}));
}

/** Entrypoint argv mixes OVMS options with ours: at least every --mtls_* flag must exist. */
function assertKnownMtlsFlags(argv: string[]): void {
  for (const arg of argv) {
    const name = /^--(mtls_[a-z_]+)/.exec(arg)?.[1];
    if (name) assert.ok(optionSpec(name), `${arg} is not an ovms-mtls option`);
  }
}

function flagValue(argv: string[], flag: string): string | undefined {
  return argv.find((a) => a.startsWith(`--${flag}=`))?.slice(`--${flag}=`.length);
}

describe('docker-compose.yml', () => {
  const compose = parse(read('docker-compose.yml'), { merge: true }) as Yaml;
  const services = compose['services'] as Record<string, Yaml>;

  test('has the single-container layout, the sidecar layout and the one-shot certs-init service', () => {
    for (const name of ['certs-init', 'ovms-secure', 'ovms', 'ovms-mtls-proxy']) assert.ok(services[name], `service ${name}`);
    assert.deepEqual(services['ovms-secure']!['profiles'], ['single']);
    assert.deepEqual(services['ovms']!['profiles'], ['sidecar']);
    assert.match(services['certs-init']!['command'].join(' '), /ovms-mtls certs init --dir \/certs/);
  });

  test('every host path it mounts or reads exists in the repository', () => {
    for (const [name, service] of Object.entries(services)) {
      for (const volume of (service['volumes'] ?? []) as string[]) {
        const source = volume.split(':')[0]!;
        if (source.startsWith('.')) assert.ok(existsSync(join(ROOT, source)), `${name}: ${source} is missing`);
        else assert.ok(source in (compose['volumes'] ?? {}), `${name}: named volume ${source} is not declared`);
      }
      for (const file of (service['env_file'] ?? []) as string[]) assert.ok(existsSync(join(ROOT, file)), `${name}: ${file} is missing`);
      if (service['build']) assert.ok(existsSync(join(ROOT, service['build']['context'], 'Dockerfile')));
    }
  });

  test('servers mount the certificates read-only', () => {
    for (const name of ['ovms-secure', 'ovms-mtls-proxy', 'probe']) {
      assert.ok((services[name]!['volumes'] as string[]).includes('certs:/certs:ro'), name);
    }
  });

  test('in the sidecar layout OVMS binds loopback only and publishes only the proxy ports', async () => {
    const ovms = services['ovms']!['command'] as string[];
    const proxy = services['ovms-mtls-proxy']!['command'] as string[];
    assert.equal(services['ovms-mtls-proxy']!['network_mode'], 'service:ovms');
    assert.equal(flagValue(ovms, 'grpc_bind_address'), '127.0.0.1');
    assert.equal(flagValue(ovms, 'rest_bind_address'), '127.0.0.1');
    // All clients share the proxy's connection (terminate mode): OVMS's per-connection cap, its core count, must not hold them.
    assert.equal(flagValue(ovms, 'grpc_channel_arguments'), `grpc.max_concurrent_streams=${UNCAPPED_OVMS_STREAMS}`);
    assert.equal(proxy[0], 'proxy');
    await assertValidProxyArgs(proxy.slice(1));
    assert.equal(flagValue(proxy, 'mtls_grpc_upstream'), `127.0.0.1:${flagValue(ovms, 'port')}`);
    assert.equal(flagValue(proxy, 'mtls_rest_upstream'), `127.0.0.1:${flagValue(ovms, 'rest_port')}`);
    const published = (services['ovms']!['ports'] as string[]).map((p) => p.split(':').at(-1)).sort();
    assert.deepEqual(published, [flagValue(proxy, 'port'), flagValue(proxy, 'rest_port')].sort());
  });

  test('the probe service waits until ovms-secure passes its healthcheck, not merely until it started', () => {
    assert.ok(services['ovms-secure']!['healthcheck'], 'ovms-secure has no healthcheck to wait for');
    assert.deepEqual(services['probe']!['depends_on'], { 'ovms-secure': { condition: 'service_healthy' } });
  });

  // Docker SIGKILLs a check still running at its timeout and records only "Health check exceeded
  // timeout": with the probe's default 10 s per step and a 10 s timeout, a hung OVMS (a ServerLive
  // with no answer) never got the probe's "no answer before the deadline" into the health log.
  test('the healthcheck outlasts every step of the probe it runs, so the probe reports the failing layer', async () => {
    const healthcheck = services['ovms-secure']!['healthcheck'] as Yaml;
    const [form, program, command, ...args] = healthcheck['test'] as string[];
    assert.deepEqual([form, program, command], ['CMD', '/usr/local/bin/ovms-mtls', 'probe']);
    const parsed = await parseCommandLine(args, PROBE_OPTIONS, PROBE_USAGE, 'probe');
    const given = (name: string) => [parsed[name]].flat().at(-1) as string | number | undefined;
    const stepSeconds = Number(given('timeout') ?? DEFAULT_PROBE_TIMEOUT_S);
    // One after another, each up to --timeout: per port its TLS handshake, gRPC ServerLive and
    // ServerReady or REST /v2/health/ready, and with --model that model's metadata.
    const perPort = (grpc: boolean) => (grpc ? 3 : 2) + (given('model') === undefined ? 0 : 1);
    const steps = (given('port') === undefined ? 0 : perPort(true)) + (given('rest_port') === undefined ? 0 : perPort(false));
    const startSeconds = 2; // the executable's own start, on a loaded machine
    const timeout = Number(/^(\d+)s$/.exec(String(healthcheck['timeout']))?.[1]);
    assert.ok(timeout >= steps * stepSeconds + startSeconds,
      `healthcheck timeout ${healthcheck['timeout']}: the probe may take ${steps} steps x ${stepSeconds} s (--timeout) + ${startSeconds} s to start`);
  });

  test('the servers get longer than their shutdown timeout to stop (compose SIGKILLs after 10 s by default)', () => {
    for (const name of ['ovms-secure', 'ovms-mtls-proxy']) {
      const command = services[name]!['command'] as string[];
      const shutdown = Number(flagValue(command, 'mtls_shutdown_timeout') ?? DEFAULTS.shutdownTimeoutSeconds);
      const grace = /^(\d+)s$/.exec(String(services[name]!['stop_grace_period']))?.[1];
      assert.ok(grace !== undefined && Number(grace) > shutdown, `${name}: stop_grace_period ${services[name]!['stop_grace_period']} (need more than --mtls_shutdown_timeout ${shutdown} s)`);
    }
  });

  test('a hung OVMS in ovms-secure is ended (--mtls_ovms_hang_timeout) and the container started again (a restart policy for the exit code 124)', () => {
    const command = services['ovms-secure']!['command'] as string[];
    assert.ok(entrypointSettings(splitOvmsArgv(command), {}).hangTimeoutMs > 0, 'no --mtls_ovms_hang_timeout: a hung OVMS stays hung');
    assert.match(String(services['ovms-secure']!['restart']), /^(on-failure|always|unless-stopped)/, 'without a restart policy the container stays down after the watchdog ends OVMS');
  });

  test('the entrypoint and probe services pass only options ovms-mtls knows', async () => {
    assertKnownMtlsFlags(services['ovms-secure']!['command']);
    const probe = services['probe']!['command'] as string[];
    assert.equal(probe[0], 'probe');
    await parseCommandLine(probe.slice(1), PROBE_OPTIONS, PROBE_USAGE, 'probe');
  });

  describe('certs-init, run as compose runs it (sh -c) on a directory standing in for the certs volume', () => {
    const script = (services['certs-init']!['command'] as string[])[0]!;
    const runIn = (dir: string) => {
      const local = script.replaceAll('/usr/local/bin/ovms-mtls', join(ROOT, 'bin/ovms-mtls')).replaceAll('/certs', dir);
      const run = spawnSync('/bin/sh', ['-c', local], { encoding: 'utf8' });
      assert.equal(run.status, 0, run.stdout + run.stderr);
      return run.stdout;
    };
    const serverPem = (dir: string) => readFileSync(join(dir, 'server.pem'), 'utf8');
    /** The state a 30-day set reaches: its CRL is past its next update, so the proxy would refuse to start. */
    const outliveCrl = async (dir: string) => {
      const issuer = { certPem: readFileSync(join(dir, 'client_cert_ca.pem'), 'utf8'), keyPem: readFileSync(join(dir, 'client_cert_ca.key'), 'utf8'), serialHex: '' };
      writeFileSync(join(dir, 'client_cert_ca.crl'), await createCrl({ issuer, thisUpdate: new Date(Date.now() - 31 * 86_400_000), nextUpdate: new Date(Date.now() - 86_400_000) }));
    };
    const withDir = async (t: TestContext) => {
      const dir = await mkdtemp(join(tmpdir(), 'ovms-mtls-certs-init-'));
      t.after(() => rm(dir, { recursive: true, force: true }));
      return dir;
    };

    test('writes a set once, then leaves a valid one as it is', async (t) => {
      const dir = await withDir(t);
      runIn(dir);
      const first = serverPem(dir);
      assert.ok(existsSync(join(dir, '.certs-init')));
      assert.match(runIn(dir), /already holds a set/);
      assert.equal(serverPem(dir), first);
    });

    test('writes its own set again once it fails the check (expired), instead of leaving the proxy unable to start', async (t) => {
      const dir = await withDir(t);
      runIn(dir);
      const first = serverPem(dir);
      await outliveCrl(dir);
      assert.match(runIn(dir), /writing a new one/);
      assert.notEqual(serverPem(dir), first);
      assert.match(runIn(dir), /already holds a set/);
    });

    test('never touches a set it did not write, even an expired one', async (t) => {
      const dir = await withDir(t);
      runIn(dir);
      rmSync(join(dir, '.certs-init'));
      await outliveCrl(dir);
      const crl = readFileSync(join(dir, 'client_cert_ca.crl'), 'utf8');
      assert.match(runIn(dir), /did not write; left as it is/);
      assert.equal(readFileSync(join(dir, 'client_cert_ca.crl'), 'utf8'), crl);
    });
  });

  const dockerCompose = spawnSync('docker-compose', ['version'], { encoding: 'utf8' });
  test('docker-compose config accepts it', { skip: dockerCompose.status !== 0 && 'docker-compose (Debian package) is not installed' }, () => {
    execFileSync('docker-compose', ['-f', 'docker-compose.yml', '--profile', 'single', '--profile', 'sidecar', 'config', '-q'], { cwd: ROOT, stdio: 'pipe' });
  });
});

describe('Dockerfile', () => {
  const dockerfile = read('Dockerfile');
  const stages = dockerfile.split(/^FROM /m).slice(1);
  const finalStage = stages.at(-1)!;
  const copies = [...dockerfile.matchAll(/^COPY\s+(--from=(\S+)\s+)?(.+)$/gm)].map((m) => ({ from: m[2], paths: m[3]!.trim().split(/\s+/) }));

  test('builds on openvino/model_server with the tag as a build argument', () => {
    assert.match(dockerfile, /^ARG OVMS_TAG=\S+$/m);
    assert.match(finalStage, /^openvino\/model_server:\$\{OVMS_TAG\}/);
  });

  test('runs as ovms under tini, with no npm or node in the final stage', () => {
    assert.equal([...finalStage.matchAll(/^USER (\S+)$/gm)].at(-1)?.[1], 'ovms');
    assert.match(finalStage, /^ENTRYPOINT \["\/usr\/bin\/tini", "--", "\/usr\/local\/bin\/ovms-mtls"\]$/m);
    assert.doesNotMatch(finalStage, /^RUN .*\b(npm|node|apt-get)\b/m);
    assert.match(stages[0]!, /apt-get install .*\btini\b/);
  });

  test('every file it copies from the build context exists and is not excluded by .dockerignore', () => {
    const allowed = read('.dockerignore').split('\n').filter((l) => l.startsWith('!')).map((l) => l.slice(1).replace(/\/$/, ''));
    for (const copy of copies.filter((c) => !c.from)) {
      for (const source of copy.paths.slice(0, -1)) {
        const path = source.replace(/\/$/, '');
        assert.ok(existsSync(join(ROOT, path)), `COPY ${source}: missing`);
        assert.ok(allowed.some((a) => path === a || path.startsWith(a + '/')), `COPY ${source}: excluded by .dockerignore`);
      }
    }
  });

  test('what it copies out of the build stage is what `npm run build:binary` produces', () => {
    const fromBuild = copies.filter((c) => c.from === 'build').map((c) => c.paths[0]!);
    const output = execFileSync(process.execPath, ['scripts/build-binary.mjs', '--print-output'], { cwd: ROOT, encoding: 'utf8' }).trim();
    assert.ok(fromBuild.includes(`/src/${output}`), `Dockerfile copies ${fromBuild.join(', ')}; build-binary writes ${output}`);
    for (const path of fromBuild.filter((p) => p.startsWith('/src/') && !p.startsWith('/src/dist/sea/'))) {
      assert.ok(existsSync(join(ROOT, path.slice('/src/'.length))), `${path} is not produced by the build`);
    }
    const pkg = JSON.parse(read('package.json')) as { scripts: Record<string, string> };
    assert.match(pkg.scripts['build:binary']!, /scripts\/build-binary\.mjs/);
  });
});

describe('Kubernetes manifests', () => {
  const dir = 'deploy/kubernetes';
  const docs = readdirSync(join(ROOT, dir)).filter((f) => f.endsWith('.yaml')).flatMap((file) =>
    parseAllDocuments(read(join(dir, file))).map((doc) => {
      assert.deepEqual(doc.errors, [], `${file} does not parse`);
      return doc.toJSON() as Yaml;
    }));
  const byKind = (kind: string) => docs.filter((d) => d['kind'] === kind);
  const deployment = byKind('Deployment')[0]!;
  const pod = deployment['spec']['template']['spec'] as Yaml;
  const container = pod['containers'][0] as Yaml;
  const args = container['args'] as string[];

  test('the kustomization lists every manifest and nothing missing', () => {
    const resources = byKind('Kustomization')[0]!['resources'] as string[];
    for (const r of resources) assert.ok(existsSync(join(ROOT, dir, r)), r);
    const files = readdirSync(join(ROOT, dir)).filter((f) => f.endsWith('.yaml') && f !== 'kustomization.yaml');
    assert.deepEqual([...resources].sort(), files.sort());
  });

  test('the Deployment runs non-root with probes on the admin port', () => {
    assert.equal(pod['securityContext']['runAsNonRoot'], true);
    assert.equal(container['securityContext']['allowPrivilegeEscalation'], false);
    const admin = container['ports'].find((p: Yaml) => p['name'] === 'admin');
    assert.equal(String(admin['containerPort']), flagValue(args, 'mtls_admin_port'));
    assert.notEqual(flagValue(args, 'mtls_admin_bind_address'), '127.0.0.1', 'kubelet probes cannot reach a loopback-only admin port');
    assert.deepEqual([container['livenessProbe']['httpGet'], container['readinessProbe']['httpGet']], [{ path: '/healthz', port: 'admin' }, { path: '/readyz', port: 'admin' }]);
    assertKnownMtlsFlags(args);
  });

  /** What the entrypoint makes of the Deployment's args. */
  const settings = () => entrypointSettings(splitOvmsArgv(args), {});

  test('the number of proxy workers does not follow the node: without a CPU limit the default is every CPU of it', () => {
    const cpuLimit = container['resources']?.['limits']?.['cpu'];
    assert.ok(flagValue(args, 'mtls_workers') !== undefined || cpuLimit !== undefined, 'set --mtls_workers (or a CPU limit): on a 64-CPU node the default starts 64 workers inside the memory limit');
    if (cpuLimit === undefined) assert.equal(settings().common.workers, Number(flagValue(args, 'mtls_workers')));
  });

  test('a preStop pause lets the endpoints forget the pod before SIGTERM, and the grace period covers it and the whole shutdown', () => {
    const command = container['lifecycle']?.['preStop']?.['exec']?.['command'] as string[] | undefined;
    assert.ok(command, 'no preStop hook: ovms-mtls stops accepting at SIGTERM, while the Service may still send it new connections');
    assert.equal(command[0], '/bin/sleep');
    const pauseSeconds = Number(command[1]);
    const shutdownSeconds = settings().common.shutdownTimeoutMs / 1000;
    assert.ok(pauseSeconds > 0, `preStop sleeps ${command[1]}`);
    assert.ok(pauseSeconds + shutdownSeconds < pod['terminationGracePeriodSeconds'], `preStop ${pauseSeconds} s + --mtls_shutdown_timeout ${shutdownSeconds} s do not fit in terminationGracePeriodSeconds ${pod['terminationGracePeriodSeconds']}`);
  });

  test('a hung OVMS is ended (--mtls_ovms_hang_timeout) and the kubelet restarts the container: the liveness probe answers for ovms-mtls only', () => {
    assert.ok(settings().hangTimeoutMs > 0, 'no --mtls_ovms_hang_timeout: a hung OVMS stays hung, the replica lost until someone notices');
    assert.equal(pod['restartPolicy'] ?? 'Always', 'Always');
  });

  test('the readiness probe waits longer than /readyz waits for OVMS', () => {
    const timeoutSeconds = container['readinessProbe']['timeoutSeconds'] ?? 1; // the kubelet's default
    assert.ok(timeoutSeconds * 1000 > UPSTREAM_CHECK_TIMEOUT_MS, `readinessProbe.timeoutSeconds ${timeoutSeconds}: the kubelet gives up before /readyz has OVMS's answer (up to ${UPSTREAM_CHECK_TIMEOUT_MS} ms)`);
  });

  test('certificates come from a Secret mounted where the entrypoint looks, without subPath', () => {
    const certsVolume = pod['volumes'].find((v: Yaml) => v['secret']) as Yaml;
    const mount = container['volumeMounts'].find((m: Yaml) => m['name'] === certsVolume['name']) as Yaml;
    assert.equal(mount['mountPath'], dirname(DEFAULTS.tlsFilesInContainer.cert));
    assert.equal(mount['subPath'], undefined);
  });

  test('the model config file is in the mounted ConfigMap', () => {
    const configPath = flagValue(args, 'config_path')!;
    const mount = container['volumeMounts'].find((m: Yaml) => configPath.startsWith(m['mountPath'] + '/')) as Yaml;
    const volume = pod['volumes'].find((v: Yaml) => v['name'] === mount['name']) as Yaml;
    const configMap = byKind('ConfigMap').find((c) => c['metadata']['name'] === volume['configMap']['name'])!;
    const json = JSON.parse(configMap['data'][configPath.slice(mount['mountPath'].length + 1)]);
    assert.equal(json.model_config_list[0].config.name, 'dummy');
  });

  // config/ovms-mtls.env told Kubernetes users to make this ConfigMap, and no pod read it: an
  // allow-list put there was never applied, and every client the CA vouches for got in.
  test('the ConfigMap config/ovms-mtls.env says to create is read by the container (envFrom), and optional', () => {
    const name = /kubectl create configmap (\S+) --from-env-file=config\/ovms-mtls\.env/.exec(read('config/ovms-mtls.env'))?.[1];
    assert.ok(name, 'config/ovms-mtls.env no longer says how to make its ConfigMap');
    const refs = ((container['envFrom'] ?? []) as Yaml[]).map((source) => source['configMapRef'] as Yaml | undefined);
    // Optional: a pod whose required ConfigMap is missing never starts (CreateContainerConfigError).
    assert.deepEqual(refs.filter((ref) => ref?.['name'] === name), [{ name, optional: true }], `the Deployment does not read the ConfigMap ${name}`);
  });

  test('the Service selects the pods and targets their mTLS ports', () => {
    const service = byKind('Service')[0]!;
    const labels = deployment['spec']['template']['metadata']['labels'];
    for (const [k, v] of Object.entries(service['spec']['selector'])) assert.equal(labels[k], v);
    const named = new Set(container['ports'].map((p: Yaml) => p['name']));
    for (const port of service['spec']['ports']) assert.ok(named.has(port['targetPort']), port['targetPort']);
    assert.ok(!service['spec']['ports'].some((p: Yaml) => p['targetPort'] === 'admin'), 'the admin port stays inside the cluster node');
  });
});

describe('example configuration', () => {
  // Tools that report their dependencies' versions read them so; without the entry in exports, ERR_PACKAGE_PATH_NOT_EXPORTED.
  test('the package\'s package.json is readable by name (ovms-mtls/package.json), its version the one built', () => {
    const pkg = JSON.parse(read('package.json')) as { version: string };
    const byName = createRequire(import.meta.url)('ovms-mtls/package.json') as { version: string };
    assert.equal(byName.version, pkg.version);
  });

  // main, types and exports named dist/src/index.js, which nothing built: `import 'ovms-mtls'` failed with ERR_MODULE_NOT_FOUND.
  test('the package entry (package.json main, types, exports) is built, and a program that imports the package by name starts a proxy with it', async () => {
    const pkg = JSON.parse(read('package.json')) as { main: string; types: string; exports: Record<string, string> };
    for (const file of [pkg.main, pkg.types, pkg.exports['.']!]) assert.ok(existsSync(join(ROOT, file)), `${file} does not exist`);
    // By name, as a dependent program would (Node resolves a package's own name through its exports).
    const packageName = 'ovms-mtls';
    const lib = (await import(packageName)) as typeof import('../src/index.js');
    const pki = await createTestPki();
    const [restPort, deadPort] = (await freeLoopbackPorts(2)) as [number, number];
    const options = lib.proxyConfigFromOptions({
      rest_port: String(restPort), rest_bind_address: '127.0.0.1', mtls_rest_upstream: `127.0.0.1:${deadPort}`,
      mtls_cert: pki.paths['server.pem']!, mtls_key: pki.paths['server.key']!, mtls_client_ca: pki.paths['client_cert_ca.pem']!,
    });
    const config = { ...options, ...(await lib.resolveListenAddresses(options)) };
    // The README says the library leaves the process to its host: no signal or error handlers, no process state changed.
    const processState = () => ({
      handlers: ['SIGINT', 'SIGTERM', 'SIGHUP', 'SIGUSR1', 'SIGUSR2', 'uncaughtException', 'unhandledRejection'].map((event) => process.listenerCount(event)),
      umask: process.umask(), cwd: process.cwd(), title: process.title, exitCode: process.exitCode,
    });
    const before = processState();
    const proxy = await lib.startProxy({ config, material: lib.loadTlsMaterialSync(config.tls), logger: lib.createLogger({ level: 'silent' }) });
    try {
      assert.deepEqual(processState(), before);
      assert.equal(proxy.port('rest'), restPort);
      const answer = await https1(restPort, pki, { path: '/v2/health/ready' });
      assert.equal(answer.status, 502);
      assert.match(answer.body, /refused the connection/);
    } finally {
      await proxy.shutdown(1000);
      await pki.cleanup();
    }
  });

  // The command line refuses an option it does not know; the package entry took any name and
  // dropped it: `mtls_alow_cn: 'alice'` (one l) made a proxy that let in every client the CA vouches for.
  test('the package entry refuses an option name `ovms-mtls proxy` does not take, as the command line does, naming the one meant', async () => {
    const lib = (await import('ovms-mtls')) as typeof import('../src/index.js');
    const given = { rest_port: '8443', mtls_rest_upstream: '127.0.0.1:8000', mtls_cert: 'server.pem', mtls_key: 'server.key', mtls_client_ca: 'client_cert_ca.pem' };
    const refused = (extra: Record<string, string>, message: RegExp) => assert.throws(() => lib.proxyConfigFromOptions({ ...given, ...extra }), { code: 'ERR_CONFIG', message });
    refused({ mtls_alow_cn: 'alice' }, /^unknown option 'mtls_alow_cn' \(did you mean 'mtls_allow_cn'\?\)$/);
    refused({ mtls_bogus: 'alice' }, /^unknown option 'mtls_bogus': the names are those of `ovms-mtls proxy --help`, without the dashes$/);
    refused({ mtlsAllowCn: 'alice' }, /^unknown option 'mtlsAllowCn' \(did you mean 'mtls_allow_cn'\?\)/);
    refused({ '--mtls_allow_cn': 'alice' }, /^unknown option '--mtls_allow_cn' \(did you mean 'mtls_allow_cn'\?\)/);
    refused({ allow_cn: 'alice' }, /^unknown option 'allow_cn' \(did you mean 'mtls_allow_cn'\?\)/);
    refused({ OVMS_MTLS_REST_PORT: '8443' }, /^unknown option 'OVMS_MTLS_REST_PORT' \(did you mean 'rest_port'\?\)/);
    refused({ mtls_ovms_binary: '/ovms/bin/ovms' }, /^--mtls_ovms_binary applies to the OVMS entrypoint only/);
    assert.deepEqual(lib.proxyConfigFromOptions({ ...given, mtls_allow_cn: 'alice' }).allow.cn, ['alice']);
  });

  // ProxyObserver, which startProxy's `observer` takes, was not exported: a program could not name what it implements.
  test('the package entry exports what a program needs to observe the data path: ProxyObserver and NOOP_OBSERVER', async () => {
    const lib = (await import('ovms-mtls')) as typeof import('../src/index.js');
    const pki = await createTestPki();
    const upstream = await startModelServer({ restPort: 0 });
    const [restPort] = (await freeLoopbackPorts(1)) as [number];
    const paths: string[] = [];
    const observer: import('../src/index.js').ProxyObserver = { ...lib.NOOP_OBSERVER, request: (record) => paths.push(record.path) };
    const options = lib.proxyConfigFromOptions({
      rest_port: String(restPort), rest_bind_address: '127.0.0.1', mtls_rest_upstream: `127.0.0.1:${upstream.restPort}`,
      mtls_cert: pki.paths['server.pem']!, mtls_key: pki.paths['server.key']!, mtls_client_ca: pki.paths['client_cert_ca.pem']!,
    });
    const config = { ...options, ...(await lib.resolveListenAddresses(options)) };
    const proxy = await lib.startProxy({ config, material: lib.loadTlsMaterialSync(config.tls), logger: lib.createLogger({ level: 'silent' }), observer });
    try {
      assert.equal((await https1(restPort, pki, { path: '/v2/health/ready' })).status, 200);
      await eventually(() => paths.length > 0, 'the request reported to the observer');
      assert.deepEqual(paths, ['/v2/health/ready']);
    } finally {
      await proxy.shutdown(1000);
      await upstream.close();
      await pki.cleanup();
    }
  });

  // startProxy() serves neither workers nor the admin listener: `mtls_workers: '4'` gave one process, without a word.
  test('the package entry refuses what only the `ovms-mtls proxy` command serves: workers and the admin listener', async () => {
    const lib = (await import('ovms-mtls')) as typeof import('../src/index.js');
    const given = { rest_port: '8443', mtls_rest_upstream: '127.0.0.1:8000', mtls_cert: 'server.pem', mtls_key: 'server.key', mtls_client_ca: 'client_cert_ca.pem' };
    for (const [name, value] of [['mtls_workers', '4'], ['mtls_admin_port', '9100'], ['mtls_admin_bind_address', '127.0.0.1']] as const) {
      assert.throws(() => lib.proxyConfigFromOptions({ ...given, [name]: value }), { code: 'ERR_CONFIG', message: new RegExp(`^${name} is served by the \\\`ovms-mtls proxy\\\` command .*not by startProxy\\(\\)`) }, name);
    }
  });

  // The classes of the errors the package entry throws were not exported: a program could tell bad input from
  // a bug only by `code` strings, and could not type a logger's options or the raw options without dist/src paths.
  test('the package entry exports the errors it throws for bad input, each an OvmsMtlsError with the line the command prints', async (t) => {
    const lib = (await import('ovms-mtls')) as typeof import('../src/index.js');
    const pki = await createTestPki();
    t.after(() => pki.cleanup());
    const blocker = createTcpServer().listen(0, '127.0.0.1');
    await once(blocker, 'listening');
    t.after(() => blocker.close());
    const busy = (blocker.address() as AddressInfo).port;
    const tls: RawOptions = { mtls_cert: pki.paths['server.pem']!, mtls_key: pki.paths['server.key']!, mtls_client_ca: pki.paths['client_cert_ca.pem']! };
    const given: RawOptions = { ...tls, rest_port: String(busy), rest_bind_address: '127.0.0.1', mtls_rest_upstream: '127.0.0.1:9' };
    const thrown = async (run: () => unknown): Promise<unknown> => {
      try {
        await run();
      } catch (err) {
        return err;
      }
      assert.fail('no error');
    };
    const config = lib.proxyConfigFromOptions(given);
    const logged: string[] = [];
    const loggerOptions: LoggerOptions = { level: 'info', destination: { write: (line: string) => void logged.push(line) } };
    const cases = [
      { cls: lib.ConfigError, err: await thrown(() => lib.proxyConfigFromOptions({ ...given, rest_port: 'abc' })), argv: ['--rest_port', 'abc'] },
      { cls: lib.TlsMaterialError, err: await thrown(() => lib.loadTlsMaterialSync({ ...config.tls, cert: pki.paths['client.pem']! })), argv: ['--mtls_cert', pki.paths['client.pem']!] },
      { cls: lib.TlsMaterialError, err: await thrown(() => lib.loadTlsMaterial({ ...config.tls, cert: pki.paths['client.pem']! })), argv: ['--mtls_cert', pki.paths['client.pem']!] },
      { cls: lib.ListenError, err: await thrown(() => lib.startProxy({ config, material: lib.loadTlsMaterialSync(config.tls), logger: lib.createLogger(loggerOptions) })), argv: [] },
    ];
    const asArgv = Object.entries(given).flatMap(([name, value]) => [`--${name}`, String(value)]);
    for (const { cls, err, argv } of cases) {
      assert.ok(err instanceof cls && err instanceof lib.OvmsMtlsError, `${String(err)} is not a ${cls.name}`);
      const cli = await runCli(['proxy', ...asArgv, ...argv]);
      assert.equal(cli.stderr, `ovms-mtls: ${err.message}\n`);
    }
    assert.deepEqual(logged, [], 'a start that failed logged nothing');
  });

  // A program reloading with proxy.reloadTls() (all the package entry offered) left a client it had just revoked
  // connected for as long as it kept its connection; `ovms-mtls proxy` closes it, through TlsReloader, which was not exported.
  test('the package entry exports the reloader the command uses: a CRL that revokes a connected client closes its connection', async (t) => {
    const lib = (await import('ovms-mtls')) as typeof import('../src/index.js');
    const pki = await createTestPki();
    const upstream = await startModelServer({ restPort: 0 });
    const started: { proxy?: import('../src/index.js').RunningProxy } = {};
    t.after(async () => {
      await started.proxy?.shutdown(1000); // closedByReload shuts it down too; a second call waits for the first
      await upstream.close();
      await pki.cleanup();
    });
    const crl = join(pki.dir, 'reloaded.crl');
    writeFileSync(crl, await createCrl({ issuer: pki.clientCa }));
    const [restPort] = (await freeLoopbackPorts(1)) as [number];
    const options = lib.proxyConfigFromOptions({
      rest_port: String(restPort), rest_bind_address: '127.0.0.1', mtls_rest_upstream: `127.0.0.1:${upstream.restPort}`,
      mtls_cert: pki.paths['server.pem']!, mtls_key: pki.paths['server.key']!, mtls_client_ca: pki.paths['client_cert_ca.pem']!, mtls_crl: crl,
    });
    const config = { ...options, ...(await lib.resolveListenAddresses(options)) };
    const material = lib.loadTlsMaterialSync(config.tls);
    const logs = new LogCapture();
    const logger = lib.createLogger({ level: 'debug', destination: logs });
    const proxy = (started.proxy = await lib.startProxy({ config, material, logger }));
    const reloader = new lib.TlsReloader({ files: config.tls, current: material, proxy, logger, revokedGraceMs: 1000 });
    const front = { proxy, logs, restPort, grpcPort: 0, grpcAddress: '' };
    const revokeClient = async () => writeFileSync(crl, await createCrl({ issuer: pki.clientCa, revoked: [{ serialHex: pki.revokedClient.serialHex }] }));
    await closedByReload(pki, { front, reloader }, pki.revokedClient, revokeClient, /CN=revoked client/, 'revoked');
  });

  // The README named the library entry and showed no code: what a program writes was in src/index.ts's comment alone.
  test('the README\'s library example compiles as a strict TypeScript program importing the package by name (node16 and bundler resolution), and runs to its end: the process exits by itself', async (t) => {
    const readme = read('README.md');
    const section = readme.slice(readme.indexOf('### As a library'), readme.indexOf('### Certificates, checks, probe'));
    const example = /```ts\n([\s\S]*?)```/.exec(section)?.[1];
    assert.ok(example, 'the README has no ```ts block under "As a library"');
    const pki = await createTestPki();
    const upstream = await startModelServer({ restPort: 0 });
    // A program of its own with the package among its dependencies, linked as `npm link` does.
    const dir = await mkdtemp(join(tmpdir(), 'readme-library-'));
    mkdirSync(join(dir, 'node_modules', '@types'), { recursive: true });
    symlinkSync(ROOT, join(dir, 'node_modules', 'ovms-mtls'));
    symlinkSync(join(ROOT, 'node_modules', '@types', 'node'), join(dir, 'node_modules', '@types', 'node'));
    writeFileSync(join(dir, 'package.json'), JSON.stringify({ name: 'gateway', type: 'module', private: true }));
    t.after(async () => {
      await rm(dir, { recursive: true, force: true });
      await upstream.close();
      await pki.cleanup();
    });
    const [restPort] = (await freeLoopbackPorts(1)) as [number];
    const asRun = example
      .replace(/'certs\/([a-z_.]+)'/g, (_, name: string) => `'${pki.paths[name]}'`)
      .replace("rest_port: '8443',", `rest_port: '${restPort}', rest_bind_address: '127.0.0.1',`)
      .replace('127.0.0.1:8000', `127.0.0.1:${upstream.restPort}`);
    assert.doesNotMatch(asRun, /certs\/|8443|:8000/, 'a path or port of the example was not swapped for this run\'s');
    writeFileSync(join(dir, 'example.ts'), asRun);
    const tsc = join(ROOT, 'node_modules/typescript/bin/tsc');
    for (const [module, resolution] of [['node16', 'node16'], ['esnext', 'bundler']] as const) {
      const compilerOptions = { target: 'ES2022', module, moduleResolution: resolution, strict: true, exactOptionalPropertyTypes: true, noUncheckedIndexedAccess: true, types: ['node'], outDir: resolution };
      writeFileSync(join(dir, `tsconfig.${resolution}.json`), JSON.stringify({ compilerOptions, files: ['example.ts'] }));
      const compiled = await runCommand(process.execPath, [tsc, '-p', `tsconfig.${resolution}.json`], { cwd: dir });
      assert.equal(compiled.code, 0, `${resolution}: ${compiled.stdout}`);
    }
    const ran = await runCommand(process.execPath, [join(dir, 'node16', 'example.js')], { cwd: dir });
    assert.equal(ran.code, 0, ran.stderr);
    const events = ran.stdout.split('\n').filter((line) => line.startsWith('{')).map((line) => (JSON.parse(line) as { event?: string }).event);
    assert.deepEqual(events.filter((event) => event === 'listening' || event === 'reloaded'), ['listening', 'reloaded'], ran.stdout);
  });

  // The command line refuses `--mtls_crl=` and `--rest_bind_address=`; the package entry took an empty value for
  // no value: { mtls_crl: '' } (an unset variable's `?? ''`) served without revocation checks, and an empty bind address on every address.
  test('the package entry refuses a text option given empty, as the command line does', async () => {
    const lib = (await import('ovms-mtls')) as typeof import('../src/index.js');
    const given = { rest_port: '8443', mtls_rest_upstream: '127.0.0.1:8000', mtls_cert: 'server.pem', mtls_key: 'server.key', mtls_client_ca: 'client_cert_ca.pem' };
    for (const name of ['mtls_crl', 'rest_bind_address', 'mtls_rest_mode']) {
      assert.throws(() => lib.proxyConfigFromOptions({ ...given, [name]: ' ' }), { code: 'ERR_CONFIG', message: new RegExp(`^--${name} needs a value`) }, name);
    }
    assert.equal(lib.proxyConfigFromOptions({ ...given, mtls_crl: undefined }).tls.crl, undefined, 'undefined is an option not given');
  });

  // "files" named all of dist/: after `npm run build:binary`, `npm pack` took the 100 MB executable, its blob and
  // bundle, and the compiled tests and benchmarks (632 files, 39 MB packed).
  test('the npm package holds what bin/ovms-mtls and the package entry run, not the single executable, the compiled tests or source maps without their sources', () => {
    const packed = execFileSync('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { cwd: ROOT, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
    const files = (JSON.parse(packed) as [{ files: { path: string }[] }])[0].files.map((f) => f.path);
    const pkg = JSON.parse(read('package.json')) as { main: string };
    for (const needed of ['bin/ovms-mtls', 'dist/src/cli/main.js', pkg.main, 'proto/kserve_v2.proto', 'config/ovms-mtls.env']) {
      assert.ok(files.includes(needed.replace(/^\.\//, '')), `${needed} is not in the package`);
    }
    assert.deepEqual(files.filter((path) => path.startsWith('dist/') && !path.startsWith('dist/src/')), []);
    // The source maps name src/*.ts, which the package does not hold: a third of its unpacked size, useless to a debugger.
    assert.deepEqual(files.filter((path) => path.endsWith('.map')), []);
    assert.deepEqual(files.filter((path) => /\.(key|pem|crl|p12)$|(^|\/)(test|bench|certs)\//.test(path)), [], 'keys, certificates, tests or benchmarks');
  });

  /** A set made by certs/README.md's own commands, pointed at `dir` in place of certs/. */
  function makeSetAsCertsReadmeSays(dir: string): void {
    const block = /```sh\n([\s\S]*?)```/.exec(read('certs/README.md'))![1]!;
    const script = block.replaceAll('--dir certs', `--dir ${dir}`).replaceAll('certs/', `${dir}/`);
    const made = spawnSync('/bin/sh', ['-e', '-c', script], { cwd: ROOT, encoding: 'utf8' });
    assert.equal(made.status, 0, made.stderr);
  }

  // The layout names a top-level certs/ that the README's and the Dockerfile's commands use: a fresh clone
  // lacked it, and a key written there must never be one `git add` away from a commit.
  test('certs/ is in the repository with its README only, and git ignores every file `certs` writes there', async (t: TestContext) => {
    assert.equal(execFileSync('git', ['ls-files', 'certs'], { cwd: ROOT, encoding: 'utf8' }), 'certs/README.md\n');
    const dir = await mkdtemp(join(tmpdir(), 'certs-layout-'));
    t.after(() => rm(dir, { recursive: true, force: true }));
    makeSetAsCertsReadmeSays(dir);
    const client = await runCli(['certs', 'client', '--dir', dir, '--name', 'alice', '--days', '1']);
    assert.equal(client.code, 0, client.stderr);
    const written = readdirSync(dir);
    assert.ok(written.includes('server.key') && written.includes('alice.key'), written.join(' '));
    for (const name of written) {
      const ignored = spawnSync('git', ['check-ignore', '-q', `certs/${name}`], { cwd: ROOT });
      assert.equal(ignored.status, 0, `certs/${name} would not be ignored by git`);
    }
  });

  // certs/README.md said the image read the keys as root at start; it runs as ovms (uid 5000), which
  // cannot read the mode 0600 server.key that certs init writes for the user who ran it: exit 2 at start.
  test('certs/README.md hands server.key to the uid the image runs as, which can then load the set',
    { skip: !(process.getuid?.() === 0 && existsSync('/usr/bin/setpriv')) && 'needs root and util-linux setpriv' }, async (t) => {
      const imageUid = (parse(read('deploy/kubernetes/deployment.yaml')) as Yaml)['spec']['template']['spec']['securityContext']['runAsUser'] as number;
      const [, chown, uid] = /`sudo (chown (\d+) certs\/server\.key)`/.exec(read('certs/README.md')) ?? [];
      assert.equal(Number(uid), imageUid, `certs/README.md gives no \`sudo chown ${imageUid} certs/server.key\` for the image's user`);
      const dir = await mkdtemp(join(tmpdir(), 'certs-image-uid-'));
      t.after(() => rm(dir, { recursive: true, force: true }));
      chmodSync(dir, 0o755);
      makeSetAsCertsReadmeSays(dir);
      const checkAsImage = () => runCli(['check', '--mtls_cert', join(dir, 'server.pem'), '--mtls_key', join(dir, 'server.key'),
        '--mtls_client_ca', join(dir, 'client_cert_ca.pem'), '--mtls_crl', join(dir, 'client_cert_ca.crl')],
      { wrap: ['setpriv', `--reuid=${imageUid}`, `--regid=${imageUid}`, '--clear-groups'], cwd: '/' });
      const asWritten = await checkAsImage();
      assert.equal(asWritten.code, 1, 'the step is needed: the image\'s uid cannot read the key certs init wrote');
      assert.match(asWritten.stdout, new RegExp(`--mtls_key: ${dir}/server\\.key cannot be read by uid ${imageUid} `));
      execFileSync('/bin/sh', ['-e', '-c', chown!.replaceAll('certs/', `${dir}/`)]);
      const handedOver = await checkAsImage();
      assert.equal(handedOver.code, 0, handedOver.stdout + handedOver.stderr);
    });

  test('config/ovms-mtls.env documents every OVMS_MTLS_* variable and no other', () => {
    const text = read('config/ovms-mtls.env');
    const listed = [...text.matchAll(/^#?(OVMS_MTLS_[A-Z0-9_]+)=/gm)].map((m) => m[1]!).sort();
    const expected = ALL_OPTIONS.map((o) => envVarName(o.name)).sort();
    assert.deepEqual(listed, expected, 'regenerate the entries for new or removed options in src/options.ts');
    for (const option of ALL_OPTIONS) assert.ok(text.includes(`# --${option.name}: `), `--${option.name} has no description line`);
  });

  // The env file and the README gave `\,` for a comma inside a value, and systemd's EnvironmentFile=
  // drops the backslash: `OVMS_MTLS_ALLOW_CN=Smith\, John` became an allow-list of CN Smith and CN John.
  const systemdEnvParser = '/usr/lib/systemd/user-environment-generators/30-systemd-environment-d-generator';
  test('the env file\'s systemd spelling of a comma inside a value reaches the proxy as one value, through systemd\'s own parser',
    { skip: !existsSync(systemdEnvParser) && 'systemd is not installed' }, async (t) => {
      const [, example, asWritten] = /^#\s+(OVMS_MTLS_ALLOW_CN=\S.*?)\s+\(systemd; docker and kubectl: (.+)\)$/m.exec(read('config/ovms-mtls.env')) ?? [];
      assert.ok(example && asWritten, 'config/ovms-mtls.env does not show how systemd users write a comma inside a value');
      // docker run --env-file and kubectl --from-env-file pass the value on as written.
      assert.deepEqual(parseAllowList(optionsFromEnv({ OVMS_MTLS_ALLOW_CN: asWritten })).cn, ['Smith, John']);
      // The generator reads environment.d files with the parser of EnvironmentFile= (parse_env_file_internal)
      // and prints the result shell-quoted.
      const dir = await mkdtemp(join(tmpdir(), 'ovms-mtls-systemd-env-'));
      t.after(() => rm(dir, { recursive: true, force: true }));
      mkdirSync(join(dir, 'environment.d'));
      writeFileSync(join(dir, 'environment.d', '50-ovms-mtls.conf'), example + '\n');
      writeFileSync(join(dir, 'parsed'), execFileSync(systemdEnvParser, { env: { XDG_CONFIG_HOME: dir }, encoding: 'utf8' }));
      const value = execFileSync('/bin/sh', ['-c', '. "$1" && printf %s "$OVMS_MTLS_ALLOW_CN"', 'sh', join(dir, 'parsed')], { encoding: 'utf8' });
      assert.deepEqual(parseAllowList(optionsFromEnv({ OVMS_MTLS_ALLOW_CN: value })).cn, ['Smith, John']);
    });

  test('config/config.json serves the demo dummy model', () => {
    const config = JSON.parse(read('config/config.json'));
    assert.deepEqual(config.model_config_list.map((m: Yaml) => m.config.name), ['dummy']);
  });

  test('the systemd unit runs a proxy command line the CLI accepts', async () => {
    const unit = read('deploy/systemd/ovms-mtls.service').replace(/\\\n/g, ' ');
    const execStart = /^ExecStart=(\S+) (.*)$/m.exec(unit)!;
    assert.equal(execStart[1], '/usr/local/bin/ovms-mtls');
    const argv = execStart[2]!.trim().split(/\s+/);
    assert.equal(argv[0], 'proxy');
    await assertValidProxyArgs(argv.slice(1));
  });
});

/**
 * A rolling update on the gRPC port, as users run the proxy in Kubernetes: several replicas in front of one model
 * server, clients configured with every replica's address (grpc-go with a resolver of several addresses, grpcio and
 * grpc-js with an `ipv4:` target of several), a steady stream of ModelInfer calls, several in flight at once, and a
 * ModelStreamInfer stream open across the drain (SIGTERM: proxy.shutdown()) of the replica they use. The drain sends each
 * connection GOAWAY with the last stream it took: a call the client sent after that id was not processed, and gRPC
 * clients send it again on another connection; the replica's listener is closed, so that connection goes to the other.
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer as createTcpServer, Socket } from 'node:net';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { clientCredentials, drainOnlyConnection, startTestProxy, startUpstream, type LogLine, type StartedProxy } from './helpers/harness.js';
import { inferRequest } from './helpers/grpc-calls.js';
import { buildKserveGoClient } from './helpers/go-build.js';
import { GRPCIO_SCRIPT, PYTHON, pythonStubs, type PythonStubs } from './helpers/grpcio.js';
import { CommandedClient, failuresOf, type Command, type SteadyOutcome } from './helpers/client-processes.js';
import { eventually } from './helpers/ops.js';
import { ACK, END_HEADERS, H2, grpcHeaderBlock, h2Frame, literalField, rawH2Client, streamFrames, type RawH2Client } from './helpers/raw-h2.js';
import { echoClient, kserveClient, type EchoClient, type KserveClient } from '../src/demo/grpc-client.js';
import type { ModelServer } from '../src/demo/model-server.js';

const KSERVE = '/inference.GRPCInferenceService';
const ECHO_UNARY = '/ovmsmtls.test.Echo/Unary';
const GRPC_MODES = ['terminate', 'relay'] as const;
type Mode = (typeof GRPC_MODES)[number];
const POLICIES = ['pick_first', 'round_robin'] as const;
type Policy = (typeof POLICIES)[number];
const WORKERS = 4;
const STREAM_IDS = ['s0', 's1', 's2'];

let pki: TestPki;
let upstream: ModelServer;
let workDir: string;
let goBinary: string;
let descriptors: string;
let stubs: PythonStubs;

interface Failure {
  err: string;
}
type Outcome = SteadyOutcome<Failure>;

/** A steady stream of ModelInfer calls from several workers: its successes so far, and its outcome once stopped. */
interface Steady {
  ok(): number;
  stop(): Promise<Outcome>;
}

/** A ModelStreamInfer call whose first reply is in; resume() sends the rest. Its request ids answered, and its code. */
interface GatedStream {
  resume(): void;
  result: Promise<{ code: string; ids: string[]; message?: string }>;
}

/** A gRPC client configured with both replicas' addresses. */
interface DrainClient {
  stream(): Promise<GatedStream>;
  /** `payloadBytes`: Echo/Unary calls of that many bytes instead of ModelInfer. */
  steady(workers: number, payloadBytes?: number): Promise<Steady>;
  close(): void;
}

before(async () => {
  pki = await createTestPki();
  upstream = await startUpstream();
  workDir = await mkdtemp(join(tmpdir(), 'ovms-mtls-grpc-drain-'));
  ({ binary: goBinary, descriptors } = await buildKserveGoClient(workDir));
  stubs = await pythonStubs();
});

after(async () => {
  await upstream?.close();
  await stubs?.cleanup();
  if (workDir) await rm(workDir, { recursive: true, force: true });
  await pki?.cleanup();
});

/** A client process of test/fixtures speaking the JSON-line commands steady, stop, stream and resume. */
interface Speaks {
  /** What a stream command says. */
  streamCall: Record<string, unknown>;
  idsOf: (result: Record<string, unknown>) => string[];
  /** What a steady command says: ModelInfer calls, or Echo/Unary calls of `payloadBytes`. */
  steadyCalls: (payloadBytes?: number) => Record<string, unknown>;
}

function commandedDrainClient(what: string, command: string, args: string[], { streamCall, idsOf, steadyCalls }: Speaks): DrainClient {
  const client = new CommandedClient<object, unknown, Outcome>(what, command, args, (id, c: Command) => JSON.stringify({ id, ...c }));
  return {
    async stream() {
      let first!: () => void;
      const firstIn = new Promise<void>((resolve) => (first = resolve));
      const { id, done } = client.send({ op: 'stream', call: streamCall }, () => first());
      const result = done.then((line) => {
        const r = line.result as Record<string, unknown> & { code: string; message?: string };
        return { code: r.code, message: r.message, ids: idsOf(r) };
      });
      await Promise.race([firstIn, result]);
      return { resume: () => void client.send({ op: 'resume', target: id }), result };
    },
    async steady(workers, payloadBytes) {
      let ok = 0;
      let started!: () => void;
      const running = new Promise<void>((resolve) => (started = resolve));
      const { id, done } = client.send({ op: 'steady', workers, ...steadyCalls(payloadBytes) }, (line) => {
        ok = line.progress as number;
        started();
      });
      await running;
      return {
        ok: () => ok,
        stop: async () => {
          await client.send({ op: 'stop', target: id }).done;
          return (await done).steady as Outcome;
        },
      };
    },
    close: () => client.close(),
  };
}

const streamRequests = STREAM_IDS.map((id) => ({ ...inferRequest(), id }));

function goDrainClient(ports: number[], policy: Policy): DrainClient {
  const identity = ['-cert', pki.paths['client.pem']!, '-key', pki.paths['client.key']!];
  const addrs = ports.map((p) => `127.0.0.1:${p}`).join(',');
  return commandedDrainClient('grpc-go client', goBinary, ['-addrs', addrs, '-lb', policy, '-ca', pki.paths['server_ca.pem']!, ...identity, '-descriptors', descriptors, '-commands'],
    {
      streamCall: { method: `${KSERVE}/ModelStreamInfer`, requests: streamRequests },
      idsOf: (r) => ((r.replies ?? []) as { infer_response: { id: string } }[]).map((reply) => reply.infer_response.id),
      steadyCalls: (payloadBytes) => ({
        call: payloadBytes ? { method: ECHO_UNARY, requests: [{ payload: Buffer.alloc(payloadBytes).toString('base64') }] } : { method: `${KSERVE}/ModelInfer`, requests: [inferRequest()] },
      }),
    });
}

function grpcioDrainClient(ports: number[], policy: Policy): DrainClient {
  const target = `ipv4:${ports.map((p) => `127.0.0.1:${p}`).join(',')}`;
  // CommandedClient runs it with PATH and LANG only: env(1) adds where the stubs are.
  return commandedDrainClient('grpcio client', 'env', [`PYTHONPATH=${stubs.dir}`, PYTHON, GRPCIO_SCRIPT, 'commands', target, pki.paths['server_ca.pem']!, pki.paths['client.pem']!, pki.paths['client.key']!, policy],
    { streamCall: {}, idsOf: (r) => r.ids as string[], steadyCalls: (payloadBytes) => (payloadBytes ? { payload_bytes: payloadBytes } : {}) });
}

/** grpc-js in this process, with the same steady stream and stream. */
function grpcJsDrainClient(ports: number[], policy: Policy): DrainClient {
  const target = `ipv4:${ports.map((p) => `127.0.0.1:${p}`).join(',')}`;
  const options = {
    'grpc.ssl_target_name_override': 'localhost',
    'grpc.default_authority': 'localhost',
    'grpc.service_config': JSON.stringify({ loadBalancingConfig: [{ [policy]: {} }] }),
  };
  const kserve: KserveClient = kserveClient(target, clientCredentials(pki), options);
  // On kserve's channel (its connection), as one client of a service's several methods would be.
  const echo: EchoClient = echoClient(target, clientCredentials(pki), { ...options, channelOverride: kserve.getChannel() } as grpc.ChannelOptions);
  // Set by close(): steady workers end too, so a test that failed half-way leaves none calling.
  let closed = false;
  const call = (payloadBytes?: number) => new Promise<void>((resolve, reject) => {
    const options = { deadline: Date.now() + 20_000 };
    const done = (err: grpc.ServiceError | null) => (err ? reject(err) : resolve());
    if (payloadBytes) echo.Unary({ payload: Buffer.alloc(payloadBytes) }, new grpc.Metadata(), options, done);
    else kserve.ModelInfer(inferRequest(), new grpc.Metadata(), options, done);
  });
  return {
    async stream() {
      const call = kserve.ModelStreamInfer(new grpc.Metadata(), { deadline: Date.now() + 60_000 });
      const ids: string[] = [];
      let first!: () => void;
      const firstIn = new Promise<void>((resolve) => (first = resolve));
      const result = new Promise<{ code: string; ids: string[]; message?: string }>((resolve) => {
        call.on('data', (reply: { infer_response: { id: string } }) => {
          ids.push(reply.infer_response.id);
          first();
        });
        call.on('status', (status: grpc.StatusObject) => resolve({ code: grpc.status[status.code], message: status.details, ids }));
        call.on('error', () => {});
      });
      call.write(streamRequests[0]);
      await Promise.race([firstIn, result]);
      return {
        resume: () => {
          for (const request of streamRequests.slice(1)) call.write(request);
          call.end();
        },
        result,
      };
    },
    async steady(workers, payloadBytes) {
      let stopped = false;
      const outcome: Outcome = { ok: 0, failures: [], statuses: {} };
      const worker = async () => {
        while (!stopped && !closed) {
          await call(payloadBytes).then(() => { outcome.ok += 1; }, (err: grpc.ServiceError) => { outcome.failures!.push({ err: `${grpc.status[err.code]}: ${err.details}` }); });
        }
      };
      const running = Array.from({ length: workers }, worker);
      await eventually(() => outcome.ok >= 20, 'grpc-js made 20 calls');
      return {
        ok: () => outcome.ok,
        stop: async () => {
          stopped = true;
          await Promise.all(running);
          return outcome;
        },
      };
    },
    close: () => {
      closed = true;
      kserve.close();
      echo.close();
    },
  };
}

/**
 * How much of a call each client keeps to send it again (its per-call retry buffer, by default): a call whose messages
 * are larger is committed to its first try. grpc-go 1.33: 256 KiB (rpc_util.go maxRetryRPCBufferSize); C-core:
 * grpc.per_rpc_retry_buffer_size 256 KiB; grpc-js: grpc.per_rpc_retry_buffer_size 1 MiB.
 */
const RETRY_BUFFER = { 'grpc-go': 256 * 1024, grpcio: 256 * 1024, 'grpc-js': 1024 * 1024 } as const;

/** What each client reports for a call past the GOAWAY's last stream id that it cannot send again. */
const REFUSED_NOT_RESENT = { 'grpc-go': 'UNAVAILABLE: the connection is draining', grpcio: 'UNAVAILABLE: GOAWAY received', 'grpc-js': 'UNAVAILABLE: Stream refused by server' } as const;

/**
 * grpc-js words the same refusal (RST_STREAM REFUSED_STREAM) as a write error when Node's HTTP/2 client reports it to a call
 * still writing its message, as Node 24's does for these large calls (Node 20's reports the stream's close first).
 */
const REFUSED_WHILE_WRITING = 'UNAVAILABLE: Write error: Stream closed with error code NGHTTP2_REFUSED_STREAM';

function refusedNotResent(name: string, failure: string): string {
  const expected = REFUSED_NOT_RESENT[name as keyof typeof REFUSED_NOT_RESENT];
  return name === 'grpc-js' && failure === REFUSED_WHILE_WRITING ? expected : failure;
}

/**
 * What the client must have sent while the GOAWAY is held for its large calls to be under way. Terminate mode: most of
 * four calls' starts. Relay mode: what the model server's windows let through (the stand-in's: 64 KiB a connection).
 */
const SENT_BEFORE_RELEASE: Record<Mode, number> = { terminate: 4 * 200 * 1024, relay: 60 * 1024 };

const CLIENTS = { 'grpc-go': goDrainClient, grpcio: grpcioDrainClient, 'grpc-js': grpcJsDrainClient } as const;

/** Two replicas of the proxy in front of the one model server. */
async function twoReplicas(mode: Mode): Promise<[StartedProxy, StartedProxy]> {
  const start = () => startTestProxy({ pki, upstream: { grpcPort: upstream.grpcPort! }, grpcMode: mode });
  return [await start(), await start()];
}

/** The calls a replica has served: an access line each (terminate mode), a relay_access line each connection once closed (relay). */
function callsServed(front: StartedProxy): number {
  const lines = front.logs.lines.filter((l) => l.listener === 'grpc');
  return lines.filter((l) => l.event === 'access').length + lines.reduce((sum, l) => sum + (l.event === 'relay_access' ? (l.calls as number) : 0), 0);
}

/** Successes at least `more` past where the stream stood: calls went on. */
async function goesOn(steady: Steady, more: number, what: string): Promise<void> {
  const from = steady.ok();
  await eventually(() => steady.ok() >= from + more, what);
}

/**
 * A TCP relay in front of one replica that can hold back what the replica sends its clients, in order, while what the
 * clients send goes on: so a client sends calls after the drain's GOAWAY went out and before it has read it, as on a
 * real network where the two cross. Nothing is lost: what was held goes out on release(), a close after it.
 */
interface HoldingRelay {
  port: number;
  /** Holds what comes from the replica from now on. */
  hold(): void;
  /** Takes no more connections, as the replica's listener closes in its drain. */
  stopListening(): void;
  /** Bytes the clients sent since hold(). */
  sentSinceHold(): number;
  release(): void;
  close(): void;
}

async function holdingRelay(targetPort: number): Promise<HoldingRelay> {
  let held: (() => void)[] | undefined;
  let sent = 0;
  const toClientInOrder = (send: () => void) => (held ? held.push(send) : send());
  const sockets = new Set<Socket>();
  const server = createTcpServer((client) => {
    const upstream = new Socket();
    upstream.connect(targetPort, '127.0.0.1');
    for (const s of [client, upstream]) {
      s.setNoDelay(true);
      s.on('error', () => {});
      sockets.add(s);
    }
    client.on('data', (chunk: Buffer) => {
      if (held) sent += chunk.length;
      upstream.write(chunk);
    });
    client.on('close', () => upstream.destroy());
    upstream.on('data', (chunk: Buffer) => toClientInOrder(() => client.write(chunk)));
    upstream.on('close', () => toClientInOrder(() => client.end()));
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    port: (server.address() as { port: number }).port,
    hold: () => {
      held = [];
    },
    stopListening: () => server.close(),
    sentSinceHold: () => sent,
    release: () => {
      const sends = held ?? [];
      held = undefined;
      for (const send of sends) send();
    },
    close: () => {
      server.close();
      for (const s of sockets) s.destroy();
    },
  };
}

/** Two replicas and a client of both; the first one, behind a HoldingRelay (which the client dials), drains. */
interface Replicas {
  draining: StartedProxy;
  relay: HoldingRelay;
  client: DrainClient;
  /** Starts the drain (SIGTERM) of the first replica. */
  drain(): Promise<void>;
}

async function withReplicas(mode: Mode, makeClient: (ports: number[], policy: Policy) => DrainClient, policy: Policy, use: (replicas: Replicas) => Promise<void>): Promise<void> {
  const [draining, staying] = await twoReplicas(mode);
  const relay = await holdingRelay(draining.grpcPort);
  // pick_first: every call goes to the draining replica while it is there.
  const client = makeClient([relay.port, staying.grpcPort], policy);
  let drained: Promise<void> | undefined;
  try {
    const drain = () => {
      relay.stopListening();
      return (drained ??= draining.proxy.shutdown(20_000));
    };
    await use({ draining, relay, client, drain });
    assert.equal(draining.logs.lines.find((l) => l.event === 'shutdown_timeout'), undefined, 'the drain waited out its timeout');
  } finally {
    client.close();
    relay.close();
    await drained?.catch(() => {});
    await draining.proxy.shutdown(1000);
    await staying.proxy.shutdown(1000);
  }
}

/**
 * Holds the draining replica's bytes back, starts its drain and a steady stream, and lets them through once the client
 * has sent `sentBytes` (its calls' starts): calls that crossed the drain's GOAWAY. The steady stream, once under way.
 */
async function steadyAcrossTheGoAway({ relay, client, drain }: Replicas, sentBytes: number, payloadBytes?: number): Promise<Steady> {
  relay.hold();
  void drain();
  const started = client.steady(WORKERS, payloadBytes);
  await eventually(() => relay.sentSinceHold() >= sentBytes, 'the client sent its calls');
  relay.release();
  return started;
}

/** The stream ended intact: every reply, status OK. */
function assertIntact(streamed: { code: string; ids: string[]; message?: string }): void {
  assert.equal(streamed.code, 'OK', streamed.message);
  assert.deepEqual(streamed.ids, STREAM_IDS);
}

/**
 * Intact, or, in terminate mode under grpcio, cut by the limit the README gives (graceful drain, terminate mode): now
 * and then (1 in ~20 runs of these cases under load) nghttp2 ends the draining connection for a protocol error of
 * grpcio's, the stream still open on it included. Captured with a frame recorder (h2c, grpcio 1.51): after the GOAWAY,
 * grpcio resets stream ids it had given calls but never sent HEADERS for (a known C-core bug, grpc/grpc#38758), and
 * a reset of a stream never opened is a connection error to nghttp2 (RFC 9113 6.4; pinned below, 'what ends a
 * draining connection'). Node's nghttp2 takes no stream after its own GOAWAY, so no drain through it can spare that.
 * Only that ending, with the line naming it, is let through; any other still fails the test.
 */
function assertIntactUnlessKnownCut(streamed: { code: string; ids: string[]; message?: string }, mode: Mode, client: string, draining: StartedProxy): void {
  const knownCut = mode === 'terminate' && client === 'grpcio' && streamed.code === 'UNAVAILABLE' &&
    draining.logs.lines.some((l) => l.event === 'h2_session_error' && l.code === 'PROTOCOL_ERROR' && String(l.msg).includes('grpc/grpc#38758'));
  if (!knownCut) assertIntact(streamed);
}

describe('--mtls_grpc_mode terminate: what ends a draining connection under grpcio now and then (the one cut the rolling-update cases accept)', () => {
  /** grpcio 1.51's, as it sends it. */
  const GRPCIO_USER_AGENT = 'grpc-python/1.51.1 grpc-c/29.0.0 (linux; chttp2)';

  /** A raw client with a ModelStreamInfer stream (id 1) open that the proxy has read. */
  async function withStreamOpen(local: StartedProxy, userAgent = GRPCIO_USER_AGENT): Promise<RawH2Client> {
    const client = await rawH2Client(local.grpcPort, pki);
    const block = Buffer.concat([grpcHeaderBlock(`${KSERVE}/ModelStreamInfer`), literalField('user-agent', userAgent)]);
    client.socket.write(h2Frame(H2.HEADERS, END_HEADERS, 1, block));
    await pingAnswered(client, 1);
    return client;
  }

  /** The same, its connection then drained: the GOAWAY read. */
  async function drainedWithStreamOpen(local: StartedProxy, userAgent = GRPCIO_USER_AGENT): Promise<RawH2Client> {
    const client = await withStreamOpen(local, userAgent);
    drainOnlyConnection(local);
    await client.waitForFrame(H2.GOAWAY);
    return client;
  }

  /** Sends a PING and waits for the `nth` ACK: nghttp2 reads in order, so it has read everything written before. */
  async function pingAnswered(client: RawH2Client, nth: number): Promise<void> {
    client.socket.write(h2Frame(H2.PING, 0, 0, Buffer.alloc(8)));
    await eventually(() => client.frames.filter((f) => f.type === H2.PING && (f.flags & ACK) !== 0).length === nth, 'the PING answered');
  }

  /** A terminating proxy in front of the model server, for `use`, shut down after it. */
  async function withTerminatingProxy(use: (local: StartedProxy) => Promise<void>): Promise<void> {
    const local = await startTestProxy({ pki, upstream: { grpcPort: upstream.grpcPort! } });
    try {
      await use(local);
    } finally {
      await local.proxy.shutdown(1000);
    }
  }

  /** `raw` resets stream 3, which it never opened; resolves, once the connection is gone, with the line nghttp2's verdict got. */
  async function resetNeverOpened(raw: RawH2Client, local: StartedProxy): Promise<LogLine> {
    raw.socket.write(h2Frame(H2.RST_STREAM, 0, 3, Buffer.alloc(4)));
    await raw.closed;
    return local.logs.waitFor((l) => l.event === 'h2_session_error' && l.code === 'PROTOCOL_ERROR');
  }

  for (const [client, userAgent] of [['grpcio', GRPCIO_USER_AGENT], ['another client', 'grpc-go/1.33.0']] as const) {
    test(`${client}: a reset of a stream id the client never opened (grpcio resets ids it gave calls it had not sent yet, grpc/grpc#38758) makes nghttp2 end the connection, the open stream with it, and the line says why${client === 'grpcio' ? ', naming grpcio\'s fault and relay mode' : ' in general terms'}; if this fails, Node tolerates it now and the rolling-update cases should no longer accept that cut`, { timeout: 30_000 }, () => withTerminatingProxy(async (local) => {
      const raw = await drainedWithStreamOpen(local, userAgent);
      const line = await resetNeverOpened(raw, local);
      const goAways = raw.frames.filter((f) => f.type === H2.GOAWAY).map((f) => f.payload.readUInt32BE(4));
      assert.equal(goAways.length, 2, 'the drain\'s GOAWAY, then one for the error');
      assert.ok(goAways[0] === 0 && goAways[1] !== 0, `GOAWAY codes ${goAways.join(', ')}`);
      assert.ok(!streamFrames(raw.frames, 1).includes('end'), `stream 1 ended by its server, not cut: ${streamFrames(raw.frames, 1).join(', ')}`);
      // Before the hint: the generic message, which named nothing a grpcio user could act on.
      assert.equal(/grpc\/grpc#38758.*--mtls_grpc_mode relay/.test(String(line.msg)), client === 'grpcio', String(line.msg));
    }));
  }

  test('grpcio, with no GOAWAY of ours before it: the same reset gets the general line (the hint is for what follows a GOAWAY)', { timeout: 30_000 }, () => withTerminatingProxy(async (local) => {
    const line = await resetNeverOpened(await withStreamOpen(local), local);
    assert.doesNotMatch(String(line.msg), /grpc\/grpc#38758/);
  }));

  test('the control: HEADERS of a stream past the GOAWAY and then its reset (what grpcio sends for a call it had sent) leave the connection and the open stream alone', { timeout: 30_000 }, () => withTerminatingProxy(async (local) => {
    const client = await drainedWithStreamOpen(local);
    client.socket.write(Buffer.concat([h2Frame(H2.HEADERS, END_HEADERS, 3, grpcHeaderBlock(`${KSERVE}/ModelInfer`)), h2Frame(H2.RST_STREAM, 0, 3, Buffer.alloc(4))]));
    // Answered after them: nghttp2 has read both frames and kept the connection.
    await pingAnswered(client, 2);
    assert.equal(client.socket.destroyed, false);
    assert.ok(!streamFrames(client.frames, 1).some((f) => f === 'end' || f.startsWith('reset')), `stream 1: ${streamFrames(client.frames, 1).join(', ')}`);
    assert.deepEqual(client.frames.filter((f) => f.type === H2.GOAWAY).map((f) => f.payload.readUInt32BE(4)), [0], 'no GOAWAY for an error');
    assert.equal(local.logs.lines.find((l) => l.event === 'h2_session_error'), undefined);
  }));
});

for (const mode of GRPC_MODES) {
  describe(`--mtls_grpc_mode ${mode}: a rolling update (drain of one replica, SIGTERM) under real gRPC clients configured with both replicas`, () => {
    for (const [name, makeClient] of Object.entries(CLIENTS)) {
      for (const policy of POLICIES) {
        test(`${name}, ${policy}: no ModelInfer call of a steady stream (${WORKERS} in flight) fails, a ModelStreamInfer stream open across the drain ends intact${policy === 'pick_first' ? ' (it is on the draining replica)' : ''}, calls go on through the other replica`, async () => {
          await withReplicas(mode, makeClient, policy, async ({ draining, client, drain }) => {
            const stream = await client.stream();
            const steady = await client.steady(WORKERS);
            const drained = drain();
            await goesOn(steady, 40, 'calls went on while the replica drained');
            stream.resume();
            const streamed = await stream.result;
            await drained;
            await goesOn(steady, 20, 'calls went on after the drain');
            const outcome = await steady.stop();
            assert.deepEqual(failuresOf(outcome), {}, `calls failed (${outcome.ok} succeeded)`);
            assertIntactUnlessKnownCut(streamed, mode, name, draining);
            if (policy === 'pick_first' && mode === 'terminate' && streamed.code === 'OK') {
              assert.ok(draining.logs.lines.some((l) => l.event === 'access' && l.path === `${KSERVE}/ModelStreamInfer` && l.grpcStatus === '0'), 'the draining replica served the stream');
            }
          });
        });
      }

      for (const busy of [true, false]) {
        const connection = busy ? 'a ModelStreamInfer stream open on its connection (ends intact)' : 'its connection idle (the drain closes it at once)';
        test(`${name}, ${connection}: calls it sent after the drain's GOAWAY went out, before it read it, are not lost (${mode === 'terminate' ? 'not taken by the draining replica, sent again to the other' : 'taken: the GOAWAY names the last stream id possible'})`, async () => {
          await withReplicas(mode, makeClient, 'pick_first', async (replicas) => {
            const { draining, client, drain } = replicas;
            const stream = busy ? await client.stream() : undefined;
            const warmUp = busy ? 1 : (await (await client.steady(1)).stop()).ok;
            // The calls' HEADERS and DATA (about 100 bytes each) have gone to the replica; its GOAWAY is held.
            const steady = await steadyAcrossTheGoAway(replicas, WORKERS * 90);
            stream?.resume();
            const streamed = await stream?.result;
            await drain();
            await goesOn(steady, 20, 'calls went on after the drain');
            const outcome = await steady.stop();
            assert.deepEqual(failuresOf(outcome), {}, `calls failed (${outcome.ok} succeeded)`);
            if (streamed) assertIntactUnlessKnownCut(streamed, mode, name, draining);
            // Terminate: nghttp2 took none of them. Relay: its connection carried them (those sent before the release) to the model server.
            if (mode === 'terminate') assert.equal(callsServed(draining), warmUp, 'the draining replica served none of the calls sent after its GOAWAY');
            else assert.ok(callsServed(draining) > warmUp, 'the draining replica served the calls sent after its GOAWAY');
          });
        });
      }

      const bytes = RETRY_BUFFER[name as keyof typeof RETRY_BUFFER] + 64 * 1024;
      test(`${name}: Echo calls of ${bytes / 1024} KiB (more than it keeps to send a call again) sent after the drain's GOAWAY went out, before it read it, ${mode === 'terminate' ? 'fail UNAVAILABLE: the client cannot send them again (no server that ignores them can help it)' : 'are taken and answered'}`, async () => {
        await withReplicas(mode, makeClient, 'pick_first', async (replicas) => {
          const stream = await replicas.client.stream();
          const steady = await steadyAcrossTheGoAway(replicas, SENT_BEFORE_RELEASE[mode], bytes);
          stream.resume();
          assertIntactUnlessKnownCut(await stream.result, mode, name, replicas.draining);
          await replicas.drain();
          await goesOn(steady, 20, 'calls went on after the drain');
          const failures = failuresOf(await steady.stop());
          if (mode === 'relay') {
            // Every call sent is taken. grpc-go 1.33 may still fail one it had queued but not sent when the GOAWAY came:
            // its writer drops the stream's headers on a draining connection ("the connection is draining"), the message
            // already buffered past its retry limit (once in a CI run; grpcio and grpc-js lose none), at most one per worker.
            const unsent = name === 'grpc-go' ? REFUSED_NOT_RESENT['grpc-go'] : undefined;
            assert.deepEqual(Object.keys(failures).filter((what) => what !== unsent), []);
            assert.ok(Object.values(failures).every((n) => n <= WORKERS), JSON.stringify(failures));
          } else {
            // Those it had started before it read the GOAWAY: the first of each worker, most likely all.
            assert.deepEqual([...new Set(Object.keys(failures).map((failure) => refusedNotResent(name, failure)))], [REFUSED_NOT_RESENT[name as keyof typeof REFUSED_NOT_RESENT]]);
            assert.ok(Object.values(failures).reduce((sum, n) => sum + n, 0) <= WORKERS, JSON.stringify(failures));
          }
        });
      });
    }
  });
}

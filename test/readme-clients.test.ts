/**
 * The README's client snippets (Usage > Clients), run as a user pastes them:
 * Debian's python3 with grpcio, requests and httpx, against the proxy and the
 * stand-in model server, with the README's paths and ports swapped for this
 * run's. The refused case uses a certificate of a CA the proxy does not trust.
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { promisify } from 'node:util';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { startTestProxy, startUpstream, type StartedProxy } from './helpers/harness.js';
import { PYTHON } from './helpers/grpcio.js';
import { buildRustProgram } from './helpers/rust-build.js';
import type { ModelServer } from '../src/demo/model-server.js';

const run = promisify(execFile);
const README = readFileSync(new URL('../../README.md', import.meta.url), 'utf8');

/** The ```LANGUAGE blocks of the README's Clients section, in order. */
function clientSnippets(language = 'python'): string[] {
  const section = README.slice(README.indexOf('### Clients'), README.indexOf('## Command-line reference'));
  return [...section.matchAll(new RegExp(`\`\`\`${language}\\n([\\s\\S]*?)\`\`\``, 'g'))].map((m) => m[1]!);
}

let pki: TestPki;
let upstream: ModelServer;
let local: StartedProxy;

before(async () => {
  [pki, upstream] = await Promise.all([createTestPki(), startUpstream()]);
  local = await startTestProxy({ pki, upstream });
});

after(async () => {
  await local.proxy.shutdown(1000);
  await upstream.close();
  await pki.cleanup();
});

/** The snippet with this run's files and ports; `client` names the certificate and key files to present. */
function asRun(snippet: string, client = 'client'): string {
  return snippet
    .replaceAll('certs/server_ca.pem', pki.paths['server_ca.pem']!)
    .replaceAll('certs/client.pem', pki.paths[`${client}.pem`]!)
    .replaceAll('certs/client.key', pki.paths[`${client}.key`]!)
    .replaceAll('localhost:9443', `localhost:${local.grpcPort}`)
    .replaceAll('localhost:8443', `localhost:${local.restPort}`);
}

/** No HTTP proxy: C-core and requests honour http_proxy even for localhost. */
function runPython(code: string): Promise<{ stdout: string; stderr: string }> {
  return run(PYTHON, ['-c', code], { env: { PATH: process.env.PATH, LANG: 'C.UTF-8' }, timeout: 60_000 });
}

/** A shell snippet, as pasted into sh, without an HTTP proxy from the environment. */
function runShell(code: string): Promise<{ stdout: string; stderr: string }> {
  return run('/bin/sh', ['-c', code], { env: { PATH: process.env.PATH, LANG: 'C.UTF-8' }, timeout: 60_000 });
}

describe('README client snippets', () => {
  test('the README has the grpcio, the requests and the httpx snippet', () => {
    const snippets = clientSnippets();
    assert.equal(snippets.length, 3);
    assert.match(snippets[0]!, /grpc\.secure_channel/);
    assert.match(snippets[1]!, /requests\.get/);
    assert.match(snippets[2]!, /httpx\.Client\(verify=context, http2=True/);
  });

  test('grpcio, as pasted: ServerReady over mTLS says ready', async () => {
    const { stdout } = await runPython(asRun(clientSnippets()[0]!));
    assert.equal(stdout, 'ready: True\n');
  });

  test('requests, as pasted: the REST readiness answers 200', async () => {
    const { stdout } = await runPython(asRun(clientSnippets()[1]!));
    assert.equal(stdout, '200\n');
  });

  // The openai SDK is not installed here; its http_client is this httpx.Client, which the README tells users to pass.
  test('httpx, as pasted: the REST readiness answers 200 over HTTP/2', async () => {
    const { stdout } = await runPython(asRun(clientSnippets()[2]!));
    assert.equal(stdout, '200 HTTP/2\n');
  });

  // The README gave no curl line; the one it gives now is run as pasted, so a change to it cannot break unnoticed.
  test('curl, as pasted: the REST readiness answers 200', async () => {
    const [curl] = clientSnippets('sh');
    assert.match(curl!, /^curl /);
    const { stdout } = await runShell(asRun(curl!));
    assert.equal(stdout, '200\n');
  });

  // Built with the crates of the Rust client fixture (a few seconds once test/rust-clients.test.ts or .ci/run built those).
  test('Rust reqwest on rustls, as pasted (built offline): the REST readiness answers 200 over HTTP/2; a certificate the proxy does not trust gets the 403', async () => {
    const [snippet] = clientSnippets('rust');
    assert.match(snippet!, /reqwest::Client::builder\(\)/);
    for (const [client, expected] of [['client', '200 OK HTTP/2.0\n'], ['foreign_client', '403 Forbidden HTTP/2.0\n']] as const) {
      const binary = await buildRustProgram(`readme-client-${client.replace('_', '-')}`, asRun(snippet!, client), 'rust-rest-client');
      const { stdout } = await run(binary, [], { env: { PATH: process.env.PATH }, timeout: 60_000 });
      assert.equal(stdout, expected);
    }
  });

  test('a certificate the proxy does not trust: grpcio gets UNAUTHENTICATED naming unknown_ca, requests, httpx and curl a 403, as the README says', async () => {
    const [grpcSnippet, restSnippet, httpxSnippet] = clientSnippets() as [string, string, string];
    await assert.rejects(runPython(asRun(grpcSnippet, 'foreign_client')),
      (err: { stderr: string }) => /StatusCode\.UNAUTHENTICATED/.test(err.stderr) && /client certificate refused \(unknown_ca\): client certificate is not issued by a trusted client CA/.test(err.stderr));
    const { stdout } = await runPython(asRun(restSnippet, 'foreign_client'));
    assert.equal(stdout, '403\n');
    assert.equal((await runPython(asRun(httpxSnippet, 'foreign_client'))).stdout, '403 HTTP/2\n');
    const curl = await runShell(asRun(clientSnippets('sh')[0]!, 'foreign_client'));
    assert.match(curl.stdout, /^\{"error":"client certificate refused \(unknown_ca\): .*"\}403\n$/);
    const refused = local.logs.lines.filter((l) => l.event === 'client_refused');
    assert.ok(refused.length >= 4, 'the proxy logged each refusal');
  });
});

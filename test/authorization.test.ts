import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { createTestPki, type TestPki } from './helpers/pki.js';
import { assertRefusedAnswer, https1, startTestProxy, startUpstream, type ProxySetup, type StartedProxy } from './helpers/harness.js';
import { createCa, createCrl, issueClientCert, type Issued } from '../src/x509.js';
import { countingUses } from './helpers/ops.js';
import { identityFromCertificate, uriPatternMatches } from '../src/client-identity.js';
import { runCommand } from './helpers/cli.js';
import { parseAllowList } from '../src/config.js';
import { optionsFromEnv } from '../src/options.js';
import type { ModelServer } from '../src/demo/model-server.js';

let pki: TestPki;
let upstream: ModelServer;
/** CN=alice, OU=ml, DNS alice.example, a SPIFFE ID three segments below the service account. */
let alice: Issued;

before(async () => {
  [pki, upstream] = await Promise.all([createTestPki(), startUpstream()]);
  alice = await issueClientCert({
    issuer: pki.clientCa,
    commonName: 'alice',
    organizationalUnit: 'ml',
    dns: ['alice.example'],
    uris: ['spiffe://example.org/ns/prod/sa/reader/replica/1'],
  });
});
after(async () => {
  await upstream.close();
  await pki.cleanup();
});

type Verdict = 'accepted' | string;

/** One REST request as `client`: 'accepted', or the reason the proxy logged for refusing it, which its 403 names too. */
async function attempt(front: StartedProxy, client: Issued): Promise<Verdict> {
  const refusals = front.logs.lines.filter((l) => l.event === 'client_refused').length;
  const response = await https1(front.restPort, pki, { path: '/v2/health/live', client });
  if (response.status === 200) return 'accepted';
  const line = await front.logs.waitFor((l) => l.event === 'client_refused' && front.logs.lines.filter((m) => m.event === 'client_refused').indexOf(l) >= refusals);
  assertRefusedAnswer(response, String(line.reason));
  return String(line.reason);
}

async function withProxy(setup: Omit<ProxySetup, 'pki' | 'upstream'>, body: (front: StartedProxy) => Promise<void>): Promise<void> {
  const front = await startTestProxy({ pki, upstream: { restPort: upstream.restPort! }, ...setup });
  try {
    await body(front);
  } finally {
    await front.proxy.shutdown(1000);
  }
}

const fingerprintOf = (issued: Issued) => new X509Certificate(issued.certPem).fingerprint256;

describe('allow-lists', () => {
  test('with no allow-list every client the CA vouches for is accepted', async () => {
    await withProxy({}, async (front) => {
      assert.equal(await attempt(front, pki.client), 'accepted');
      assert.equal(await attempt(front, alice), 'accepted');
    });
  });

  const cases: [string, ProxySetup['allow'], () => Issued, () => Issued][] = [
    ['--mtls_allow_cn', { cn: ['alice'] }, () => alice, () => pki.client],
    ['--mtls_allow_ou', { ou: ['ml'] }, () => alice, () => pki.client],
    ['--mtls_allow_dns', { dns: ['alice.example'] }, () => alice, () => pki.client],
    ['--mtls_allow_uri with * and **', { uri: ['spiffe://example.org/ns/*/sa/**'] }, () => alice, () => pki.client],
    ['--mtls_allow_uri with an exact URI', { uri: ['spiffe://test.local/client'] }, () => pki.client, () => alice],
  ];
  for (const [label, allow, admitted, refused] of cases) {
    test(`${label} admits the matching client and refuses another at the connection, logging not_allowed with its serial`, async () => {
      await withProxy({ allow }, async (front) => {
        assert.equal(await attempt(front, admitted()), 'accepted');
        assert.equal(await attempt(front, refused()), 'not_allowed');
        const line = front.logs.lines.find((l) => l.event === 'client_refused')!;
        assert.equal(line.level, 'warn');
        assert.match(String(line.subject), /CN=/);
        assert.equal(line['serial'], refused().serialHex);
      });
    });
  }

  test('--mtls_allow_fingerprint admits the certificate whose DER has that SHA-256 and refuses others', async () => {
    // Parsed as the CLI does: colons and case do not matter.
    const allow = parseAllowList({ mtls_allow_fingerprint: [fingerprintOf(alice)] });
    await withProxy({ allow }, async (front) => {
      assert.equal(await attempt(front, alice), 'accepted');
      assert.equal(await attempt(front, pki.client), 'not_allowed');
    });
  });

  test('a CN or OU holding a comma or a plus is allowed as written, the comma escaped as \\, on the command line; a plain comma still separates values', async () => {
    const allow = parseAllowList({ mtls_allow_cn: ['Smith\\, John', 'a, b'], mtls_allow_ou: 'R+D\\, Europe' });
    assert.deepEqual(allow.cn, ['Smith, John', 'a', 'b']);
    assert.deepEqual(allow.ou, ['R+D, Europe']);
    const [john, smith, europe] = await Promise.all([
      issueClientCert({ issuer: pki.clientCa, commonName: 'Smith, John' }),
      issueClientCert({ issuer: pki.clientCa, commonName: 'Smith' }),
      issueClientCert({ issuer: pki.clientCa, commonName: 'x', organizationalUnit: 'R+D, Europe' }),
    ]);
    await withProxy({ allow }, async (front) => {
      assert.equal(await attempt(front, john), 'accepted');
      assert.equal(await attempt(front, europe), 'accepted');
      assert.equal(await attempt(front, smith), 'not_allowed');
    });
  });

  test('an allow-list from the environment reads \\, as a comma inside a value, as the command line does: OVMS_MTLS_ALLOW_CN=Smith\\, John admits CN "Smith, John" and not CN "John"', async () => {
    const allow = parseAllowList(optionsFromEnv({ OVMS_MTLS_ALLOW_CN: 'Smith\\, John,b', OVMS_MTLS_ALLOW_OU: 'R+D\\, Europe' }));
    assert.deepEqual(allow.cn, ['Smith, John', 'b']);
    assert.deepEqual(allow.ou, ['R+D, Europe']);
    const [smithJohn, john] = await Promise.all([
      issueClientCert({ issuer: pki.clientCa, commonName: 'Smith, John' }),
      issueClientCert({ issuer: pki.clientCa, commonName: 'John' }),
    ]);
    await withProxy({ allow }, async (front) => {
      assert.equal(await attempt(front, smithJohn), 'accepted');
      assert.equal(await attempt(front, john), 'not_allowed');
    });
  });

  test('--mtls_allow_dns compares DNS names without regard to case, and a wildcard SAN is no name it covers', async () => {
    const allow = parseAllowList({ mtls_allow_dns: ['Api.Example.org'] });
    const [shouting, wildcard] = await Promise.all([
      issueClientCert({ issuer: pki.clientCa, commonName: 'shouting', dns: ['API.EXAMPLE.ORG'] }),
      issueClientCert({ issuer: pki.clientCa, commonName: 'wildcard', dns: ['*.example.org'] }),
    ]);
    await withProxy({ allow }, async (front) => {
      assert.equal(await attempt(front, shouting), 'accepted');
      assert.equal(await attempt(front, wildcard), 'not_allowed');
    });
  });

  test('--mtls_allow_dns in another script matches the A-label a certificate holds (certs writes bücher.example so); a name with no IDNA form is refused', async () => {
    const allow = parseAllowList({ mtls_allow_dns: ['Bücher.example'] });
    assert.deepEqual(allow.dns, ['xn--bcher-kva.example']);
    const [books, other] = await Promise.all([
      issueClientCert({ issuer: pki.clientCa, commonName: 'books', dns: ['xn--bcher-kva.example'] }),
      issueClientCert({ issuer: pki.clientCa, commonName: 'other', dns: ['bucher.example'] }),
    ]);
    await withProxy({ allow }, async (front) => {
      assert.equal(await attempt(front, books), 'accepted');
      assert.equal(await attempt(front, other), 'not_allowed');
    });
    assert.throws(() => parseAllowList({ mtls_allow_dns: ['bü\u00adß\u200b.example\uFFFF'] }), /--mtls_allow_dns: '.*' is not a host name/);
  });

  test('the CN and OUs are the attributes themselves: not text inside another value, also in a multi-valued RDN, the last CN when there are several', async () => {
    const subject = async (subj: string) => {
      const made = await runCommand('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', '/dev/null', '-subj', subj, '-multivalue-rdn', '-days', '1']);
      assert.equal(made.code, 0, made.stderr);
      const { cn, ous, subject } = identityFromCertificate(new X509Certificate(made.stdout));
      return { cn, ous, subject };
    };
    assert.deepEqual(await subject('/O=x\\, CN=admin/CN=user'), { cn: 'user', ous: [], subject: 'CN=user,O=x\\, CN=admin' });
    assert.deepEqual(await subject('/OU=ops+CN=admin/OU=a\\+b'), { cn: 'admin', ous: ['ops', 'a+b'], subject: 'OU=a\\+b,CN=admin+OU=ops' });
    assert.deepEqual(await subject('/CN=admin/CN=user'), { cn: 'user', ous: [], subject: 'CN=user,CN=admin' });
  });

  test('allow-lists of different kinds are OR-ed: a client matching any one rule gets in', async () => {
    const stranger = await issueClientCert({ issuer: pki.clientCa, commonName: 'stranger', organizationalUnit: 'ops' });
    await withProxy({ allow: { cn: ['client'], ou: ['ml'] } }, async (front) => {
      assert.equal(await attempt(front, pki.client), 'accepted');
      assert.equal(await attempt(front, alice), 'accepted');
      assert.equal(await attempt(front, stranger), 'not_allowed');
    });
  });

  test('a URI pattern: * spans exactly one path segment and ** any suffix, including none', () => {
    assert.equal(uriPatternMatches('spiffe://example.org/ns/*/sa/reader', 'spiffe://example.org/ns/prod/sa/reader'), true);
    assert.equal(uriPatternMatches('spiffe://example.org/ns/*/sa/reader', 'spiffe://example.org/ns/a/b/sa/reader'), false);
    assert.equal(uriPatternMatches('spiffe://example.org/ns/*/sa/reader', 'spiffe://example.org/ns/prod/sa/reader/x'), false);
    assert.equal(uriPatternMatches('spiffe://example.org/ns/prod/**', 'spiffe://example.org/ns/prod/sa/a/b'), true);
    assert.equal(uriPatternMatches('spiffe://example.org/ns/prod/**', 'spiffe://example.org/ns/prod/'), true);
    assert.equal(uriPatternMatches('spiffe://example.org/ns/prod/**', 'spiffe://example.org/ns/staging/sa'), false);
    // Regex characters in a pattern are literal.
    assert.equal(uriPatternMatches('spiffe://example.org/a.b', 'spiffe://example.org/aXb'), false);
  });

  test('a URI pattern: no wildcard vouches for a dot or empty segment, a query, a fragment or a %-escape', () => {
    const refused: [string, string][] = [
      ['spiffe://example.org/ns/a/**', 'spiffe://example.org/ns/a/../admin/sa/x'],
      ['spiffe://example.org/ns/a/**', 'spiffe://example.org/ns/a/./b'],
      ['spiffe://example.org/ns/*/sa/web', 'spiffe://example.org/ns/../sa/web'],
      ['spiffe://example.org/ns/*/sa/web', 'spiffe://example.org/ns//sa/web'],
      ['spiffe://example.org/ns/a/sa/*', 'spiffe://example.org/ns/a/sa/web?x=1'],
      ['spiffe://example.org/ns/a/sa/*', 'spiffe://example.org/ns/a/sa/web#x'],
      ['spiffe://example.org/ns/*/sa/web', 'spiffe://example.org/ns/a%2Fb/sa/web'],
    ];
    for (const [pattern, uri] of refused) assert.equal(uriPatternMatches(pattern, uri), false, `${pattern} must not match ${uri}`);
    assert.equal(uriPatternMatches('spiffe://example.org/ns/a/**', 'spiffe://example.org/ns/a/b.c/d'), true);
    // Without a wildcard the URI is compared as written.
    assert.equal(uriPatternMatches('spiffe://example.org/x?y', 'spiffe://example.org/x?y'), true);
  });

  test('a ** URI pattern refuses, at the connection, a client whose ID climbs out of it with ..', async () => {
    const climber = await issueClientCert({ issuer: pki.clientCa, commonName: 'climber', uris: ['spiffe://example.org/ns/prod/../admin/sa/root'] });
    await withProxy({ allow: { uri: ['spiffe://example.org/ns/prod/**'] } }, async (front) => {
      assert.equal(await attempt(front, climber), 'not_allowed');
      assert.equal(await attempt(front, alice), 'accepted');
    });
  });

  test('a * URI pattern refuses, at the connection, a client whose ID has more segments there', async () => {
    await withProxy({ allow: { uri: ['spiffe://example.org/ns/*/sa/reader'] } }, async (front) => {
      assert.equal(await attempt(front, alice), 'not_allowed');
    });
  });
});

/** A certificate the openssl CLI signs with `ca` (a base name in pki.dir: BASE.pem, BASE.key), written as NAME.pem / NAME.key; `extensions` are config lines. */
async function opensslIssue(name: string, subject: string, extensions: string, ca: string): Promise<Issued> {
  const at = (file: string) => join(pki.dir, file);
  await writeFile(at(`${name}.cnf`), `[req]\ndistinguished_name=dn\n[dn]\n[ext]\n${extensions}\n`);
  const steps = [
    ['ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', at(`${name}.key`)],
    ['req', '-new', '-key', at(`${name}.key`), '-subj', subject, '-config', at(`${name}.cnf`), '-out', at(`${name}.csr`)],
    ['x509', '-req', '-in', at(`${name}.csr`), '-CA', at(`${ca}.pem`), '-CAkey', at(`${ca}.key`), '-CAcreateserial', '-days', '1', '-extfile', at(`${name}.cnf`), '-extensions', 'ext', '-out', at(`${name}.pem`)],
  ];
  for (const step of steps) {
    const run = await runCommand('openssl', step);
    assert.equal(run.code, 0, run.stderr);
  }
  return { certPem: await readFile(at(`${name}.pem`), 'utf8'), keyPem: await readFile(at(`${name}.key`), 'utf8'), serialHex: '' };
}

const CLIENT_EXTENSIONS = 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth';
const CA_EXTENSIONS = 'basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign';
const sentWith = (leaf: Issued, ...cas: Issued[]): Issued => ({ ...leaf, certPem: leaf.certPem + cas.map((ca) => ca.certPem).join('') });

describe('chains a client builds to get past the CA', () => {
  test('a client certificate used to sign another, a CA without keyCertSign, and a CA under a pathlen:0 CA are refused verify_failed, naming the certificate at fault, with CRLs on or off', async () => {
    const plainLeaf = await opensslIssue('plain_leaf', '/CN=plain leaf', CLIENT_EXTENSIONS, 'client_cert_ca');
    const noCertSign = await opensslIssue('no_certsign', '/CN=no certsign CA', 'basicConstraints=critical,CA:TRUE\nkeyUsage=critical,digitalSignature,cRLSign', 'client_cert_ca');
    const pathLen0 = await opensslIssue('pathlen0', '/CN=pathlen0 CA', 'basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign', 'client_cert_ca');
    const below = await opensslIssue('below_pathlen0', '/CN=below pathlen0 CA', CA_EXTENSIONS, 'pathlen0');
    const cases: [Issued, RegExp][] = [
      [sentWith(await opensslIssue('admin1', '/CN=admin', CLIENT_EXTENSIONS, 'plain_leaf'), plainLeaf), /CN=plain leaf, sent by the client, signed CN=admin but is no CA \(no basicConstraints CA:TRUE\): it may not issue that certificate/],
      [sentWith(await opensslIssue('admin2', '/CN=admin', CLIENT_EXTENSIONS, 'no_certsign'), noCertSign), /CN=no certsign CA, sent by the client, signed CN=admin but has a key usage without keyCertSign/],
      [sentWith(await opensslIssue('admin3', '/CN=admin', CLIENT_EXTENSIONS, 'below_pathlen0'), below, pathLen0), /CN=pathlen0 CA, sent by the client, signed CN=below pathlen0 CA but allows 0 CA certificate\(s\) below it \(pathlen\), and the chain has 1/],
    ];
    // With CRLs on, OpenSSL's last error for a forged CA can be the CRL it has none of (crl_missing, "give one CRL per CA"): either way the chain's own fault is named.
    for (const crl of [undefined, pki.paths['client_cert_ca.crl']!]) {
      await withProxy({ tls: { crl } }, async (front) => {
        for (const [client, detail] of cases) {
          assert.equal(await attempt(front, client), 'verify_failed');
          assert.match(String(front.logs.lines.filter((l) => l.event === 'client_refused').at(-1)!.msg), detail);
        }
      });
    }
  });

  test('a revoked intermediate CA refuses its clients at the handshake, and a CRL that lapses while the proxy runs refuses every client of its CA', async () => {
    const revokedIntermediate = join(pki.dir, 'revoked_intermediate.crl');
    await writeFile(revokedIntermediate, (await createCrl({ issuer: pki.clientCa, revoked: [{ serialHex: pki.intermediateCa.serialHex }] })) + pki.intermediateCrlPem);
    await withProxy({ tls: { crl: revokedIntermediate } }, async (front) => {
      assert.equal(await attempt(front, pki.chainedClient), 'revoked');
      assert.equal(await attempt(front, pki.client), 'accepted');
    });
    const lapsing = join(pki.dir, 'lapsing.crl');
    const nextUpdate = new Date(Date.now() + 2000);
    await writeFile(lapsing, await createCrl({ issuer: pki.clientCa, thisUpdate: new Date(Date.now() - 60_000), nextUpdate }));
    await withProxy({ tls: { crl: lapsing } }, async (front) => {
      assert.equal(await attempt(front, pki.client), 'accepted');
      await new Promise((resolve) => setTimeout(resolve, nextUpdate.getTime() - Date.now() + 1100));
      assert.equal(await attempt(front, pki.client), 'crl_expired');
    });
  });
});

describe('CA bundles and chains', () => {
  test('a client behind an intermediate CA is accepted when the CRL file holds the root and intermediate CRLs', async () => {
    await withProxy({ tls: { crl: pki.paths['client_cert_ca_chain.crl']! } }, async (front) => {
      assert.equal(await attempt(front, pki.chainedClient), 'accepted');
      assert.equal(await attempt(front, pki.client), 'accepted');
    });
  });

  test('without the intermediate CRL a chained client is refused as crl_missing, since Node checks every CA of the chain, and the line names the CA the client sent', async () => {
    await withProxy({}, async (front) => {
      assert.equal(await attempt(front, pki.chainedClient), 'crl_missing');
      // Every CA of --mtls_client_ca has its CRL (startup insists): "give one CRL per trusted CA" alone sent the operator looking for nothing.
      const line = front.logs.lines.findLast((l) => l.event === 'client_refused')!;
      assert.match(line.msg, /\(UNABLE_TO_GET_CRL; CN=ovms-mtls test intermediate CA, which the client sent with its certificate \(it is not in --mtls_client_ca\), has no CRL in --mtls_crl: add that CA's CRL there\)$/);
    });
  });

  test('--mtls_verify_depth 2 refuses a leaf + intermediate + root chain and still accepts a leaf + root one', async () => {
    await withProxy({ tls: { crl: pki.paths['client_cert_ca_chain.crl']! }, limits: { verifyDepth: 2 } }, async (front) => {
      assert.equal(await attempt(front, pki.chainedClient), 'chain_too_long');
      assert.equal(await attempt(front, pki.client), 'accepted');
    });
  });

  test('--mtls_verify_depth counts an intermediate CA taken from --mtls_client_ca: a client sending only its leaf is refused at 2, accepted at 3', async () => {
    const clientCa = join(pki.dir, 'root_and_intermediate.pem');
    await writeFile(clientCa, pki.clientCa.certPem + pki.intermediateCa.certPem);
    const tls = { clientCa, crl: pki.paths['client_cert_ca_chain.crl']! };
    await withProxy({ tls, limits: { verifyDepth: 2 } }, async (front) => {
      assert.equal(await attempt(front, pki.chainedLeafOnly), 'chain_too_long');
      assert.equal(await attempt(front, pki.client), 'accepted');
    });
    await withProxy({ tls, limits: { verifyDepth: 3 } }, async (front) => {
      assert.equal(await attempt(front, pki.chainedLeafOnly), 'accepted');
    });
  });

  test('a client of the last of many intermediate CAs of the bundle: --mtls_verify_depth counts its path, which the handshake finds by name, not by trying each CA of the bundle', async () => {
    const intermediates = await Promise.all(Array.from({ length: 30 }, (_, i) => createCa({ commonName: `ovms-mtls test issuing CA ${i}`, issuer: pki.clientCa })));
    const leaf = await issueClientCert({ issuer: intermediates.at(-1)!, commonName: 'client of the last issuing CA' });
    const clientCa = join(pki.dir, 'many_intermediates.pem');
    await writeFile(clientCa, pki.clientCa.certPem + intermediates.map((ca) => ca.certPem).join(''));
    await withProxy({ tls: { clientCa, crl: undefined }, limits: { verifyDepth: 2 } }, async (front) => {
      assert.equal(await attempt(front, leaf), 'chain_too_long');
    });
    await withProxy({ tls: { clientCa, crl: undefined }, limits: { verifyDepth: 3 } }, async (front) => {
      const issuerChecks = countingUses(X509Certificate.prototype, 'checkIssued');
      try {
        assert.equal(await attempt(front, leaf), 'accepted');
      } finally {
        issuerChecks.stop();
      }
      assert.ok(issuerChecks.count < intermediates.length, `${issuerChecks.count} issuer checks for one handshake`);
    });
  });

  test('a bundle of two CAs, each with its CRL in one file, accepts clients of both and still refuses the revoked one', async () => {
    const clientCa = join(pki.dir, 'two_client_cas.pem');
    const crl = join(pki.dir, 'two_client_cas.crl');
    await writeFile(clientCa, pki.clientCa.certPem + pki.otherCa.certPem);
    await writeFile(crl, pki.crlPem + pki.otherCaCrlPem);
    await withProxy({ tls: { clientCa, crl } }, async (front) => {
      assert.equal(await attempt(front, pki.client), 'accepted');
      assert.equal(await attempt(front, pki.foreignClient), 'accepted');
      assert.equal(await attempt(front, pki.revokedClient), 'revoked');
    });
  });
});

describe('the subject as the model server gets it', () => {
  test('XFCC\'s Subject is the subject as openssl -nameopt RFC2253 (and Envoy) write it: a multi-valued RDN joined by a bare +, quotes, commas, semicolons and = escaped', async () => {
    const tricky = await opensslIssue('tricky_subject', '/O=a\\, "b"; c=d <e>/OU=ops+CN=admin/OU=x\\+y', CLIENT_EXTENSIONS, 'client_cert_ca');
    const printed = await runCommand('openssl', ['x509', '-noout', '-subject', '-nameopt', 'RFC2253', '-in', join(pki.dir, 'tricky_subject.pem')]);
    const expected = printed.stdout.trim().replace(/^subject=/, '');
    assert.match(expected, /\+/);
    await withProxy({}, async (front) => {
      assert.equal(await attempt(front, tricky), 'accepted');
      const xfcc = String(upstream.received.at(-1)!.headers['x-forwarded-client-cert']);
      // Envoy's quoting: a quoted value with \\ and \" inside.
      const quoted = /;Subject="((?:[^"\\]|\\.)*)"/.exec(xfcc)?.[1];
      assert.equal(quoted?.replace(/\\(.)/g, '$1'), expected, xfcc);
      assert.equal((await front.logs.waitFor((l) => l.event === 'access')).subject, expected);
    });
  });
});

describe('certificates with an empty subject', () => {
  /** Self-signed, so its issuer is empty too: a certificate any client can make. */
  async function namelessSelfSigned(): Promise<Issued> {
    const at = (file: string) => join(pki.dir, file);
    const made = await runCommand('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', at('nameless.key'), '-out', at('nameless.pem'),
      '-subj', '/', '-addext', 'subjectAltName=critical,DNS:nameless.example', '-days', '1']);
    assert.equal(made.code, 0, made.stderr);
    return { certPem: await readFile(at('nameless.pem'), 'utf8'), keyPem: await readFile(at('nameless.key'), 'utf8'), serialHex: '' };
  }

  test('a client with an empty subject and issuer is refused unknown_ca, and one the client CA names in subjectAltName alone gets in by its URI with Subject="" in XFCC; the proxy serves on', async () => {
    // Node gives undefined, not '', for an empty name: reading it as a string took the process down at the handshake.
    const [stranger, sanOnly] = await Promise.all([
      namelessSelfSigned(),
      opensslIssue('san_only', '/', `${CLIENT_EXTENSIONS}\nsubjectAltName=critical,URI:spiffe://example.org/ns/prod/sa/nameless`, 'client_cert_ca'),
    ]);
    await withProxy({ allow: { uri: ['spiffe://example.org/ns/prod/**'] } }, async (front) => {
      assert.equal(await attempt(front, stranger), 'unknown_ca');
      const refused = front.logs.lines.filter((l) => l.event === 'client_refused').at(-1)!;
      assert.equal(refused.subject, '');
      assert.match(String(refused.msg), /issued by \(empty name\)/);
      assert.equal(await attempt(front, sanOnly), 'accepted');
      assert.match(String(upstream.received.at(-1)!.headers['x-forwarded-client-cert']), /^Hash=[0-9a-f]{64};Subject="";URI=spiffe:\/\/example\.org\/ns\/prod\/sa\/nameless$/);
      const access = await front.logs.waitFor((l) => l.event === 'access');
      assert.equal(access.subject, '');
      assert.equal(await attempt(front, pki.client), 'not_allowed');
    });
    await withProxy({ allow: { cn: ['client'] } }, async (front) => {
      assert.equal(await attempt(front, sanOnly), 'not_allowed');
      assert.equal(front.logs.lines.filter((l) => l.event === 'client_refused').at(-1)!.subject, '');
    });
  });

  test('a client refused at verification is logged with its subject in RFC 2253 order, as a not_allowed refusal and the access lines write it', async () => {
    const expired = await issueClientCert({ issuer: pki.clientCa, commonName: 'late', organizationalUnit: 'ops', notBefore: new Date(Date.now() - 10 * 86_400_000), days: 1 });
    await withProxy({ allow: { cn: ['alice'] } }, async (front) => {
      assert.equal(await attempt(front, expired), 'expired');
      assert.equal(await attempt(front, pki.client), 'not_allowed');
      const subjects = front.logs.lines.filter((l) => l.event === 'client_refused').map((l) => [l.reason, l.subject]);
      assert.deepEqual(subjects, [['expired', 'CN=late,OU=ops'], ['not_allowed', 'CN=client,OU=tests']]);
    });
  });
});

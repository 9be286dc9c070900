/**
 * OCSP checking of client certificates (RFC 6960, requests as RFC 5019 profiles them): what nginx's
 * `ssl_ocsp on|leaf` does, for PKIs that publish revocation by OCSP (AD CS, EJBCA, step-ca, Vault).
 * Fails closed: a client whose status cannot be learnt (no responder, no answer, an answer that does
 * not verify or is stale) is refused, saying what failed.
 */
import { X509Certificate, createHash, verify as verifySignature, type KeyObject } from 'node:crypto';
import { request as httpRequest } from 'node:http';
import { AsnConvert, OctetString } from '@peculiar/asn1-schema';
import { AlgorithmIdentifier, AuthorityInfoAccessSyntax, Certificate, id_ad_ocsp, id_pe_authorityInfoAccess } from '@peculiar/asn1-x509';
import { BasicOCSPResponse, CertID, OCSPRequest, OCSPResponse, OCSPResponseStatus, Request, TBSRequest, id_kp_OCSPSigning, id_pkix_ocsp_basic, type SingleResponse } from '@peculiar/asn1-ocsp';
import { refusal, rfc2253Name, type Refusal } from './client-identity.js';
import { certificateNames } from './crl-index.js';
import { encodeTlv, readSingleTlv, readTlvs } from './x509/der.js';
import { CLOCK_SKEW_MS } from './x509/validity.js';

export const OCSP_MODES = ['off', 'leaf', 'chain'] as const;
export type OcspMode = (typeof OCSP_MODES)[number];

/** `--mtls_ocsp` leaf or chain, with its responder override and the bound on one lookup. */
export interface OcspSettings {
  /** leaf: the client's certificate; chain: every certificate of the verified chain below its root. */
  readonly mode: Exclude<OcspMode, 'off'>;
  /** An http:// URL asked instead of the certificates' own (Authority Information Access), as nginx's ssl_ocsp_responder. */
  readonly responder?: string | undefined;
  /** One lookup, connection to last byte. */
  readonly timeoutMs: number;
}

/** Certificates whose answers are kept; the oldest go first. */
export const OCSP_CACHE_ENTRIES = 10_000;
/** Far above an answer with a responder certificate and a chain (a few KiB). */
const MAX_ANSWER_BYTES = 256 * 1024;

const SHA1 = '1.3.14.3.2.26';
const SHA256 = '2.16.840.1.101.3.4.2.1';
const HASHES: Record<string, string> = { [SHA1]: 'sha1', [SHA256]: 'sha256' };

/**
 * Signature algorithms an answer may be signed with, as node:crypto's digest names (null: the
 * algorithm hashes itself). SHA-1 signatures are refused, as OpenSSL 3 refuses them in certificates
 * at its default security level; RSA-PSS needs its parameters read, which no responder we know uses.
 */
const SIGNATURE_DIGESTS: Record<string, string | null> = {
  '1.2.840.113549.1.1.11': 'sha256',
  '1.2.840.113549.1.1.12': 'sha384',
  '1.2.840.113549.1.1.13': 'sha512',
  '1.2.840.10045.4.3.2': 'sha256',
  '1.2.840.10045.4.3.3': 'sha384',
  '1.2.840.10045.4.3.4': 'sha512',
  '1.3.101.112': null,
  '1.3.101.113': null,
};

/** What one lookup came to: a refusal or none, kept until `until` (ms since the epoch) when the answer says how long it holds. */
interface Answer {
  readonly refused: Refusal | undefined;
  readonly until?: number | undefined;
}

/** A lookup that produced no usable answer: `reason` says whether none came or what came could not be trusted. */
class LookupFailure extends Error {
  constructor(readonly reason: 'ocsp_unavailable' | 'ocsp_invalid', message: string) {
    super(message);
  }
}

/**
 * Asks responders about client certificates, one lookup in flight per certificate however many
 * connections wait for it, and keeps answers (good, revoked or unknown) until their nextUpdate.
 * Failed lookups are not kept: the next connection asks again.
 */
export class OcspChecker {
  readonly #settings: OcspSettings;
  readonly #answers = new Map<string, Answer & { until: number }>();
  readonly #inFlight = new Map<string, Promise<Answer>>();
  /** The client CAs answers were verified under; a change forgets them (trust). */
  #trusted = '';
  /** Bumped when answers are forgotten: a lookup begun before is not kept. */
  #generation = 0;

  constructor(settings: OcspSettings) {
    this.#settings = settings;
  }

  /**
   * The client CAs now in force. An answer was verified against an issuer of the old set: when the
   * set changes (a CA removed, renewed, replaced), no answer outlives it, those in flight included.
   */
  trust(clientCas: readonly X509Certificate[]): void {
    const trusted = clientCas.map((ca) => ca.fingerprint256).sort().join(',');
    if (trusted === this.#trusted) return;
    if (this.#trusted !== '') this.forget();
    this.#trusted = trusted;
  }

  forget(): void {
    this.#answers.clear();
    this.#inFlight.clear();
    this.#generation += 1;
  }

  /**
   * Why the client of this verified chain (leaf first, its root last) is refused, or undefined when
   * every certificate checked is good. Never rejects.
   */
  async judge(path: readonly X509Certificate[]): Promise<Refusal | undefined> {
    const below = this.#settings.mode === 'leaf' ? 1 : Math.max(1, path.length - 1);
    const checks = Array.from({ length: below }, (_, i) => this.#status(path[i]!, path[i + 1], i > 0));
    for (const refused of await Promise.all(checks)) if (refused) return refused;
    return undefined;
  }

  async #status(cert: X509Certificate, issuer: X509Certificate | undefined, isCa: boolean): Promise<Refusal | undefined> {
    const who = isCa ? `CA ${rfc2253Name(cert, 'subject')}: ` : '';
    if (!issuer) return refusal('ocsp_unavailable', `${who}the verified chain holds no issuer certificate to ask about it`);
    const key = `${issuer.fingerprint256}/${cert.serialNumber}`;
    const kept = this.#answers.get(key);
    if (kept && kept.until > Date.now()) return kept.refused;
    if (kept) this.#answers.delete(key);
    let pending = this.#inFlight.get(key);
    if (!pending) {
      pending = this.#lookUp(cert, issuer, who, key);
      this.#inFlight.set(key, pending);
    }
    return (await pending).refused;
  }

  async #lookUp(cert: X509Certificate, issuer: X509Certificate, who: string, key: string): Promise<Answer> {
    const generation = this.#generation;
    const asked = await this.#ask(cert, issuer, who).catch((err: unknown): Answer => ({ refused: failureRefusal(err, who) }));
    const answer = withResponderHidden(asked, this.#settings.responder);
    if (generation !== this.#generation) return answer;
    this.#inFlight.delete(key);
    if (answer.until !== undefined) this.#keep(key, { refused: answer.refused, until: answer.until });
    return answer;
  }

  #keep(key: string, answer: Answer & { until: number }): void {
    if (this.#answers.size >= OCSP_CACHE_ENTRIES) this.#answers.delete(this.#answers.keys().next().value!);
    this.#answers.set(key, answer);
  }

  async #ask(cert: X509Certificate, issuer: X509Certificate, who: string): Promise<Answer> {
    const url = this.#settings.responder ?? responderOf(cert);
    if (url === undefined) {
      return { refused: refusal('ocsp_no_responder', `${who}the certificate names no OCSP responder (Authority Information Access) and no --mtls_ocsp_responder is set`) };
    }
    if (!/^http:\/\//i.test(url)) {
      return { refused: refusal('ocsp_no_responder', `${who}the OCSP responder the certificate names, ${url}, is not an http:// URL (OCSP is asked over plain HTTP, its answers being signed): give --mtls_ocsp_responder`) };
    }
    const id = certId(cert, issuer);
    const source = `${who}OCSP responder ${url}`;
    const body = await post(url, requestFor(id), this.#settings.timeoutMs).catch((err: unknown) => {
      throw err instanceof LookupFailure ? new LookupFailure(err.reason, `${source}: ${err.message}`) : err;
    });
    try {
      return statusIn(body, id, issuer, Date.now(), source);
    } catch (err) {
      if (err instanceof LookupFailure) throw new LookupFailure(err.reason, `${source}: ${err.message}`);
      throw new LookupFailure('ocsp_invalid', `${source}: its answer cannot be read (${(err as Error).message})`);
    }
  }
}

/**
 * --mtls_ocsp_responder is the operator's address, often an internal one: a refused client reads the
 * option's name in its place (the log keeps it). A responder a certificate names is its holder's to know.
 */
function withResponderHidden(answer: Answer, responder: string | undefined): Answer {
  const { refused } = answer;
  if (responder === undefined || refused === undefined || !refused.detail.includes(responder)) return answer;
  return { ...answer, refused: { ...refused, clientDetail: refused.detail.replaceAll(responder, '--mtls_ocsp_responder') } };
}

function failureRefusal(err: unknown, who: string): Refusal {
  if (err instanceof LookupFailure) return refusal(err.reason, err.message);
  return refusal('ocsp_unavailable', `${who}${(err as Error).message}`);
}

/** The first http(s) OCSP URL of the certificate's Authority Information Access, if any. */
export function responderOf(cert: X509Certificate): string | undefined {
  const parsed = AsnConvert.parse(cert.raw, Certificate);
  const extension = parsed.tbsCertificate.extensions?.find((e) => e.extnID === id_pe_authorityInfoAccess);
  if (!extension) return undefined;
  const access = AsnConvert.parse(extension.extnValue, AuthorityInfoAccessSyntax);
  return access.find((d) => d.accessMethod === id_ad_ocsp && d.accessLocation.uniformResourceIdentifier)?.accessLocation.uniformResourceIdentifier;
}

/** The CertID of RFC 6960 4.1.1, with SHA-1 as RFC 5019 asks (responders index by it). */
function certId(cert: X509Certificate, issuer: X509Certificate): CertID {
  const { serialNumber } = AsnConvert.parse(cert.raw, Certificate).tbsCertificate;
  return new CertID({
    hashAlgorithm: new AlgorithmIdentifier({ algorithm: SHA1, parameters: null }),
    issuerNameHash: new OctetString(issuerNameHash(issuer, 'sha1')),
    issuerKeyHash: new OctetString(issuerKeyHash(issuer, 'sha1')),
    serialNumber,
  });
}

function issuerNameHash(issuer: X509Certificate, digest: string): Buffer {
  return createHash(digest).update(Buffer.from(certificateNames(issuer.raw).subjectKey, 'hex')).digest();
}

/** Over the issuer's subjectPublicKey BIT STRING contents, without its unused-bits octet. */
function issuerKeyHash(issuer: X509Certificate, digest: string): Buffer {
  const { subjectPublicKey } = AsnConvert.parse(issuer.raw, Certificate).tbsCertificate.subjectPublicKeyInfo;
  return createHash(digest).update(Buffer.from(subjectPublicKey)).digest();
}

/** No nonce: RFC 5019 responders answer from pre-signed responses, and freshness is bounded by thisUpdate/nextUpdate. */
function requestFor(id: CertID): Buffer {
  const request = new OCSPRequest({ tbsRequest: new TBSRequest({ requestList: [new Request({ reqCert: id })] }) });
  return Buffer.from(AsnConvert.serialize(request));
}

/** POSTs an OCSP request (RFC 5019 allows POST for any size); the answer's body, or a LookupFailure saying what failed. */
function post(url: string, body: Buffer, timeoutMs: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const fail = (reason: 'ocsp_unavailable' | 'ocsp_invalid', message: string) => {
      clearTimeout(timer);
      req.destroy();
      reject(new LookupFailure(reason, message));
    };
    const req = httpRequest(url, {
      method: 'POST',
      agent: false,
      headers: { 'content-type': 'application/ocsp-request', accept: 'application/ocsp-response', 'content-length': body.length },
    });
    const timer = setTimeout(() => fail('ocsp_unavailable', `no answer within ${timeoutMs / 1000} s (--mtls_ocsp_timeout)`), timeoutMs);
    req.on('error', (err: NodeJS.ErrnoException) => fail('ocsp_unavailable', connectionFailure(err)));
    req.on('response', (res) => {
      if (res.statusCode !== 200) {
        fail('ocsp_unavailable', `answered HTTP ${res.statusCode ?? '?'}`);
        return;
      }
      const chunks: Buffer[] = [];
      let size = 0;
      res.on('data', (chunk: Buffer) => {
        size += chunk.length;
        if (size > MAX_ANSWER_BYTES) fail('ocsp_invalid', `its answer is larger than ${MAX_ANSWER_BYTES / 1024} KiB`);
        else chunks.push(chunk);
      });
      res.on('end', () => {
        clearTimeout(timer);
        resolve(Buffer.concat(chunks));
      });
      res.on('error', (err: NodeJS.ErrnoException) => fail('ocsp_unavailable', connectionFailure(err)));
    });
    req.end(body);
  });
}

function connectionFailure(err: NodeJS.ErrnoException): string {
  switch (err.code) {
    case 'ECONNREFUSED':
      return 'connection refused';
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
      return 'its host name does not resolve';
    case 'ECONNRESET':
      return 'the connection was reset before a whole answer came';
    default:
      return err.code ?? err.message;
  }
}

/** The certificate's status in a responder's answer, verified; LookupFailure when it cannot be trusted. */
function statusIn(body: Buffer, id: CertID, issuer: X509Certificate, now: number, source: string): Answer {
  const response = AsnConvert.parse(body, OCSPResponse);
  if (response.responseStatus !== OCSPResponseStatus.successful) {
    throw new LookupFailure('ocsp_unavailable', `answered ${OCSPResponseStatus[response.responseStatus] ?? `status ${response.responseStatus}`} instead of a status`);
  }
  if (response.responseBytes?.responseType !== id_pkix_ocsp_basic) throw new LookupFailure('ocsp_invalid', 'its answer is not a basic OCSP response');
  const der = Buffer.from(response.responseBytes.response.buffer);
  const basic = AsnConvert.parse(der, BasicOCSPResponse);
  verifyResponseSignature(der, basic, issuer, now);
  const single = basic.tbsResponseData.responses.find((r) => sameCertificate(r, id, issuer));
  if (!single) throw new LookupFailure('ocsp_invalid', 'its answer is not about this certificate (no matching CertID)');
  return judged(single, now, source);
}

/** The status the answer gives, `source` (the responder, and the CA asked about in chain mode) naming who said it. */
function judged(single: SingleResponse, now: number, source: string): Answer {
  const { thisUpdate, nextUpdate, certStatus } = single;
  if (thisUpdate.getTime() > now + CLOCK_SKEW_MS) throw new LookupFailure('ocsp_invalid', `its answer's thisUpdate ${thisUpdate.toISOString()} is in the future (a clock off?)`);
  if (nextUpdate && nextUpdate.getTime() < now - CLOCK_SKEW_MS) throw new LookupFailure('ocsp_invalid', `its answer is stale: its nextUpdate ${nextUpdate.toISOString()} has passed`);
  // Without nextUpdate "newer information is always available" (RFC 6960 4.2.2.1): used for this lookup alone.
  const until = nextUpdate?.getTime();
  if (certStatus.revoked) {
    const { revocationTime, revocationReason } = certStatus.revoked;
    const why = revocationReason === undefined ? '' : `, reason ${crlReasonName(revocationReason.reason)}`;
    return { refused: refusal('ocsp_revoked', `${source}: revoked at ${revocationTime.toISOString()}${why}`), until };
  }
  if (certStatus.unknown !== undefined) return { refused: refusal('ocsp_unknown', `${source}: it does not know this certificate`), until };
  if (certStatus.good === undefined) throw new LookupFailure('ocsp_invalid', 'its answer gives no status (good, revoked or unknown)');
  return { refused: undefined, until };
}

const CRL_REASON_NAMES = ['unspecified', 'keyCompromise', 'cACompromise', 'affiliationChanged', 'superseded', 'cessationOfOperation', 'certificateHold', '', 'removeFromCRL', 'privilegeWithdrawn', 'aACompromise'];

function crlReasonName(reason: number): string {
  return CRL_REASON_NAMES[reason] || `${reason}`;
}

/** Whether a SingleResponse is about the certificate asked for, by whichever hash the responder used. */
function sameCertificate(single: SingleResponse, asked: CertID, issuer: X509Certificate): boolean {
  const digest = HASHES[single.certID.hashAlgorithm.algorithm];
  if (!digest) return false;
  return Buffer.from(single.certID.serialNumber).equals(Buffer.from(asked.serialNumber))
    && Buffer.from(single.certID.issuerNameHash.buffer).equals(issuerNameHash(issuer, digest))
    && Buffer.from(single.certID.issuerKeyHash.buffer).equals(issuerKeyHash(issuer, digest));
}

/**
 * The answer must be signed by the issuer itself, or by a responder certificate the answer carries
 * that the issuer signed for OCSP signing (id-kp-OCSPSigning; RFC 6960 4.2.2.2). Each candidate is
 * tried in turn rather than found by responderID: the outcome is the same, a signature by an
 * authorized key. A delegated responder's own revocation is not checked (it usually carries
 * id-pkix-ocsp-nocheck), as OpenSSL does by default.
 */
function verifyResponseSignature(der: Buffer, basic: BasicOCSPResponse, issuer: X509Certificate, now: number): void {
  const [tbs, , signatureBits] = readTlvs(readSingleTlv(der).value);
  if (!tbs || !signatureBits) throw new LookupFailure('ocsp_invalid', 'its answer has no signed part');
  const algorithm = basic.signatureAlgorithm.algorithm;
  const digest = SIGNATURE_DIGESTS[algorithm];
  if (digest === undefined) throw new LookupFailure('ocsp_invalid', `its answer is signed with algorithm ${algorithm}, which is not accepted (SHA-256 or stronger with RSA or ECDSA, or Ed25519)`);
  const signed = encodeTlv(tbs.tag, tbs.value);
  const signature = signatureBits.value.subarray(1);
  const valid = (key: KeyObject) => safeVerify(digest, signed, key, signature);
  if (valid(issuer.publicKey)) return;
  const delegates = responderCertificates(der);
  const authorized = delegates.filter((cert) => signedFor(cert, issuer, now));
  if (authorized.some((cert) => valid(cert.publicKey))) return;
  const unauthorized = delegates.find((cert) => valid(cert.publicKey));
  if (unauthorized) {
    throw new LookupFailure('ocsp_invalid', `its answer is signed by ${rfc2253Name(unauthorized, 'subject')}, which ${unauthorized.checkIssued(issuer) ? 'the issuer did not sign for OCSP signing (no id-kp-OCSPSigning extended key usage, or out of its validity)' : 'the certificate\'s issuer did not issue'}`);
  }
  throw new LookupFailure('ocsp_invalid', 'its answer\'s signature is not by the certificate\'s issuer nor by a responder certificate it issued (bad signature)');
}

function safeVerify(digest: string | null, data: Buffer, key: KeyObject, signature: Buffer): boolean {
  try {
    return verifySignature(digest, data, key, signature);
  } catch {
    return false; // A key of another type than the algorithm's.
  }
}

/** A delegated responder certificate the issuer signed, for OCSP signing, valid now. */
function signedFor(cert: X509Certificate, issuer: X509Certificate, now: number): boolean {
  if (!cert.checkIssued(issuer) || !cert.verify(issuer.publicKey)) return false;
  if (!(cert.keyUsage ?? []).includes(id_kp_OCSPSigning)) return false;
  return Date.parse(cert.validFrom) <= now + CLOCK_SKEW_MS && now - CLOCK_SKEW_MS <= Date.parse(cert.validTo);
}

/** The certificates a BasicOCSPResponse carries ([0] EXPLICIT SEQUENCE OF Certificate), as their DER. */
function responderCertificates(der: Buffer): X509Certificate[] {
  const wrapper = readTlvs(readSingleTlv(der).value).find((tlv) => tlv.tag === 0xa0);
  if (!wrapper) return [];
  return readTlvs(readSingleTlv(wrapper.value).value).map((cert) => new X509Certificate(encodeTlv(cert.tag, cert.value)));
}

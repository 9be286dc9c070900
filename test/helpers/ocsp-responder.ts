/**
 * An OCSP responder stand-in on 127.0.0.1 (RFC 6960 over HTTP POST, RFC 5019), built with the
 * same library the proxy reads answers with, signing with the test CA's key or a delegated
 * responder's; and certificates naming it in their Authority Information Access.
 */
import { createHash, sign, X509Certificate } from 'node:crypto';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { AsnConvert, OctetString } from '@peculiar/asn1-schema';
import { AlgorithmIdentifier, Certificate } from '@peculiar/asn1-x509';
import {
  BasicOCSPResponse, CertStatus, KeyHash, OCSPRequest, OCSPResponse, OCSPResponseStatus, ResponderID, ResponseBytes, ResponseData, RevokedInfo,
  SingleResponse, id_kp_OCSPSigning, id_pkix_ocsp_basic,
} from '@peculiar/asn1-ocsp';
import { x509 } from '../../src/x509/peculiar.js';
import { crypto, loadAuthority } from '../../src/x509/authority.js';
import { generateKeyPair, privateKeyToPem, toPem } from '../../src/x509/keys.js';
import { randomSerialHex, validityPeriod } from '../../src/x509/validity.js';
import type { Issued } from '../../src/x509.js';

export type CertState = 'good' | 'revoked' | 'unknown';

/** How the stand-in answers; changeable between requests. */
export interface ResponderBehaviour {
  /** Status by certificate serial (lower-case hex, as Issued.serialHex); others are good. */
  statuses: Map<string, CertState>;
  /** Whose key signs (the issuing CA, a delegated responder, a stranger); `include` sends its certificate along. */
  signer: { issued: Issued; include: boolean };
  /** answer: a signed status; garbage: bytes that are no OCSP; http500; tryLater: an unsigned tryLater; hold: no answer until release(). */
  mode: 'answer' | 'garbage' | 'http500' | 'tryLater' | 'hold';
  /** Offsets from now, in ms; nextUpdate null leaves it out. */
  thisUpdateMs: number;
  nextUpdateMs: number | null;
}

export interface OcspResponderStandIn {
  readonly url: string;
  readonly behaviour: ResponderBehaviour;
  /** Serials asked about, in order, one per request. */
  readonly asked: string[];
  /** Answers the requests held so far, and those to come, with a signed status. */
  release(): void;
  close(): Promise<void>;
}

export async function startOcspResponder(signer: Issued, path = '/ocsp'): Promise<OcspResponderStandIn> {
  const behaviour: ResponderBehaviour = { statuses: new Map(), signer: { issued: signer, include: false }, mode: 'answer', thisUpdateMs: -60_000, nextUpdateMs: 3_600_000 };
  const asked: string[] = [];
  const held: (() => void)[] = [];
  const server = createServer((req, res) => void answer(req, res, behaviour, asked, held));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}${path}`,
    behaviour,
    asked,
    release: () => {
      behaviour.mode = 'answer';
      for (const respond of held.splice(0)) respond();
    },
    close: () => {
      server.closeAllConnections();
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
}

async function answer(req: IncomingMessage, res: ServerResponse, behaviour: ResponderBehaviour, asked: string[], held: (() => void)[]): Promise<void> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  const request = AsnConvert.parse(Buffer.concat(chunks), OCSPRequest);
  const certId = request.tbsRequest.requestList[0]!.reqCert;
  const serial = Buffer.from(certId.serialNumber).toString('hex').replace(/^(00)+(?=.)/, '');
  asked.push(serial);
  if (behaviour.mode === 'hold') {
    held.push(() => res.writeHead(200, { 'content-type': 'application/ocsp-response' }).end(Buffer.from(signedResponse(certId, behaviour.statuses.get(serial) ?? 'good', behaviour))));
    return;
  }
  if (behaviour.mode === 'http500') {
    res.writeHead(500).end('responder broken');
    return;
  }
  if (behaviour.mode === 'garbage') {
    res.writeHead(200, { 'content-type': 'application/ocsp-response' }).end('this is not DER');
    return;
  }
  const body = behaviour.mode === 'tryLater'
    ? AsnConvert.serialize(new OCSPResponse({ responseStatus: OCSPResponseStatus.tryLater }))
    : signedResponse(certId, behaviour.statuses.get(serial) ?? 'good', behaviour);
  res.writeHead(200, { 'content-type': 'application/ocsp-response' }).end(Buffer.from(body));
}

function signedResponse(certId: SingleResponse['certID'], state: CertState, behaviour: ResponderBehaviour): ArrayBuffer {
  const now = Date.now();
  const signerCert = AsnConvert.parse(new X509Certificate(behaviour.signer.issued.certPem).raw, Certificate);
  const keyHash = createHash('sha1').update(Buffer.from(signerCert.tbsCertificate.subjectPublicKeyInfo.subjectPublicKey)).digest();
  const single = new SingleResponse({
    certID: certId,
    certStatus: certStatus(state, now),
    thisUpdate: new Date(now + behaviour.thisUpdateMs),
    ...(behaviour.nextUpdateMs === null ? {} : { nextUpdate: new Date(now + behaviour.nextUpdateMs) }),
  });
  const tbs = new ResponseData({ responderID: new ResponderID({ byKey: new KeyHash(keyHash) }), producedAt: new Date(now), responses: [single] });
  const tbsDer = Buffer.from(AsnConvert.serialize(tbs));
  const { keyPem } = behaviour.signer.issued;
  const isEc = new X509Certificate(behaviour.signer.issued.certPem).publicKey.asymmetricKeyType === 'ec';
  const basic = new BasicOCSPResponse({
    tbsResponseData: tbs,
    signatureAlgorithm: isEc ? new AlgorithmIdentifier({ algorithm: '1.2.840.10045.4.3.2' }) : new AlgorithmIdentifier({ algorithm: '1.2.840.113549.1.1.11', parameters: null }),
    signature: new Uint8Array(sign('sha256', tbsDer, keyPem)).buffer,
    ...(behaviour.signer.include ? { certs: [signerCert] } : {}),
  });
  const response = new OCSPResponse({
    responseStatus: OCSPResponseStatus.successful,
    responseBytes: new ResponseBytes({ responseType: id_pkix_ocsp_basic, response: new OctetString(AsnConvert.serialize(basic)) }),
  });
  return AsnConvert.serialize(response);
}

function certStatus(state: CertState, now: number): CertStatus {
  if (state === 'revoked') return new CertStatus({ revoked: new RevokedInfo({ revocationTime: new Date(now - 3_600_000) }) });
  return state === 'good' ? new CertStatus({ good: null }) : new CertStatus({ unknown: null });
}

export interface OcspCertOptions {
  issuer: Issued;
  commonName: string;
  /** The OCSP responder its Authority Information Access names; none when absent. */
  ocspUrl?: string;
  /** clientAuth (a client), ocspSigning (a delegated responder), none (a responder without the EKU), or ca (an intermediate CA). */
  kind: 'client' | 'ocspSigning' | 'noEku' | 'ca';
}

/** A certificate as test/helpers/pki.ts issues them, with an OCSP URL and the kinds OCSP needs. */
export async function issueForOcsp(o: OcspCertOptions): Promise<Issued> {
  const authority = await loadAuthority(o.issuer);
  const keys = await generateKeyPair('ec');
  const extensions: x509.Extension[] = [
    new x509.BasicConstraintsExtension(o.kind === 'ca', o.kind === 'ca' ? 0 : undefined, true),
    new x509.KeyUsagesExtension(o.kind === 'ca' ? x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign : x509.KeyUsageFlags.digitalSignature, true),
    await x509.SubjectKeyIdentifierExtension.create(keys.publicKey, false, crypto),
    new x509.AuthorityKeyIdentifierExtension(authority.keyId),
  ];
  if (o.kind === 'client') extensions.push(new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.clientAuth], false));
  if (o.kind === 'ocspSigning') extensions.push(new x509.ExtendedKeyUsageExtension([id_kp_OCSPSigning], false));
  if (o.ocspUrl) extensions.push(new x509.AuthorityInfoAccessExtension({ ocsp: [new x509.GeneralName('url', o.ocspUrl)] }));
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: randomSerialHex(),
    subject: [{ CN: [o.commonName] }],
    issuer: authority.cert.subjectName,
    ...validityPeriod({}),
    publicKey: keys.publicKey,
    signingKey: authority.signer.privateKey,
    signingAlgorithm: authority.signer.signingAlgorithm,
    extensions,
  }, crypto);
  return { certPem: toPem(cert.rawData, 'CERTIFICATE'), keyPem: await privateKeyToPem(keys.privateKey), serialHex: cert.serialNumber.toLowerCase() };
}

/**
 * Loading of the two .proto files and the message shapes they produce.
 * Shared by the stand-in model server and by the client helpers, so that
 * both sides decode exactly the same way (keepCase, longs as strings,
 * bytes as Buffer, defaults filled in).
 */
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { getAsset, isSea } from 'node:sea';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { ConfigError } from '../errors.js';

export const KSERVE_SERVICE = 'inference.GRPCInferenceService';
export const ECHO_SERVICE = 'ovmsmtls.test.Echo';

const PROTO_FILES = ['kserve_v2.proto', 'test_echo.proto'];

let protoDirectory: string | undefined;

/**
 * Directory holding kserve_v2.proto and test_echo.proto, for a command that hands it to another
 * program (demo's grpcurl line). From the package: resolved from the compiled file
 * (dist/src/demo/protocol.js -> <repo>/proto/), because the package ships `proto/` next to `dist/`,
 * not inside it. The single executable carries them as assets and writes them out here, on first
 * need, until it exits.
 */
export function protoDir(): string {
  protoDirectory ??= isSea() ? unpackSeaProtosUntilExit() : fileURLToPath(new URL('../../../proto/', import.meta.url));
  return protoDirectory;
}

function unpackSeaProtosUntilExit(): string {
  const dir = unpackSeaProtos();
  process.once('exit', () => removeQuietly(dir));
  return dir;
}

/**
 * The executable's assets in a new private directory: the loader reads files only. Serving never
 * calls this, so a serving process leaves nothing in a /tmp that outlives container restarts
 * (a Kubernetes emptyDir).
 */
function unpackSeaProtos(): string {
  try {
    const dir = mkdtempSync(join(tmpdir(), 'ovms-mtls-'));
    for (const name of PROTO_FILES) writeFileSync(join(dir, name), getAsset(`proto/${name}`, 'utf8'), { mode: 0o444 });
    return dir;
  } catch (err) {
    throw new ConfigError(
      `cannot write ${PROTO_FILES.join(' and ')} (carried inside the executable) to the temporary directory ${tmpdir()}: ${(err as NodeJS.ErrnoException).code ?? String(err)}; ` +
        'mount a writable /tmp (a tmpfs, or an emptyDir in Kubernetes) or set TMPDIR to a writable directory',
    );
  }
}

/** A leftover directory is harmless, and at exit nothing could report it any more. */
function removeQuietly(dir: string): void {
  try {
    rmSync(dir, { recursive: true, force: true });
  } catch {
    // best effort
  }
}

let cached: grpc.GrpcObject | undefined;

/** Parses both protos once per process; later calls reuse the result. */
export function loadProtos(): grpc.GrpcObject {
  cached ??= grpc.loadPackageDefinition(isSea() ? loadSeaDefinition() : loadDefinition(protoDir()));
  return cached;
}

function loadDefinition(dir: string): protoLoader.PackageDefinition {
  return protoLoader.loadSync(requireProtoFiles(dir, PROTO_FILES), loaderOptions(dir));
}

/**
 * The loader reads the files at once, so their directory goes as soon as it has: a probe ended by
 * a signal while it waits on a server (Ctrl-C, SIGTERM, a health check's SIGKILL at its timeout)
 * runs no exit handler, and left its copy behind each time.
 */
function loadSeaDefinition(): protoLoader.PackageDefinition {
  const dir = unpackSeaProtos();
  try {
    return loadDefinition(dir);
  } finally {
    removeQuietly(dir);
  }
}

function loaderOptions(dir: string): protoLoader.Options {
  return { keepCase: true, longs: String, enums: String, bytes: Buffer, defaults: true, oneofs: true, includeDirs: [dir] };
}

/** The loader would only say ENOENT for a bare file name. */
function requireProtoFiles(dir: string, names: string[]): string[] {
  const missing = names.find((name) => !existsSync(join(dir, name)));
  if (missing === undefined) return names;
  throw new ConfigError(`${join(dir, missing)} does not exist: the .proto files belong next to dist/ in the package; reinstall it`);
}

/** Finds a service constructor by its full name, e.g. `inference.GRPCInferenceService`. */
export function serviceConstructor(fullName: string): grpc.ServiceClientConstructor {
  let node: unknown = loadProtos();
  for (const part of fullName.split('.')) {
    node = (node as Record<string, unknown> | undefined)?.[part];
  }
  if (typeof node !== 'function' || !('service' in node)) {
    throw new Error(`service ${fullName} not found in ${PROTO_FILES.join(' or ')}`);
  }
  return node as grpc.ServiceClientConstructor;
}

// ---------------------------------------------------------------------------
// Message shapes. Request types are loose (fields optional, as protobuf
// allows); response types list what `defaults: true` guarantees.
// int64 fields arrive as decimal strings (longs: String) and may be sent as
// numbers or strings.

export type Int64 = string | number;

export interface InferParameter {
  bool_param?: boolean;
  int64_param?: Int64;
  string_param?: string;
  double_param?: number;
  uint64_param?: Int64;
  /** Which member of the oneof is set (filled in on decode). */
  parameter_choice?: string;
}

export interface InferTensorContents {
  bool_contents?: boolean[];
  int_contents?: number[];
  int64_contents?: Int64[];
  uint_contents?: number[];
  uint64_contents?: Int64[];
  fp32_contents?: number[];
  fp64_contents?: number[];
  bytes_contents?: Buffer[];
}

export interface InferTensor {
  name: string;
  datatype: string;
  shape: Int64[];
  parameters?: Record<string, InferParameter>;
  contents?: InferTensorContents | null;
}

export interface ModelInferRequest {
  model_name: string;
  model_version?: string;
  id?: string;
  parameters?: Record<string, InferParameter>;
  inputs: InferTensor[];
  outputs?: { name: string; parameters?: Record<string, InferParameter> }[];
  raw_input_contents?: Buffer[];
}

export interface ModelInferResponse {
  model_name: string;
  model_version: string;
  id: string;
  parameters: Record<string, InferParameter>;
  outputs: InferTensor[];
  raw_output_contents: Buffer[];
}

export interface ModelStreamInferResponse {
  error_message: string;
  infer_response: ModelInferResponse | null;
}

export interface TensorMetadata {
  name: string;
  datatype: string;
  shape: Int64[];
}

export interface ModelMetadataResponse {
  name: string;
  versions: string[];
  platform: string;
  inputs: TensorMetadata[];
  outputs: TensorMetadata[];
}

export interface ServerMetadataResponse {
  name: string;
  version: string;
  extensions: string[];
}

export interface ModelRef {
  name: string;
  version?: string;
}

export type Empty = Record<string, never>;

export interface EchoRequest {
  payload?: Buffer | Uint8Array;
  count?: number;
  fail_with_code?: number;
}

export interface EchoReply {
  payload: Buffer;
  count: number;
}

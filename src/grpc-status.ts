/** gRPC status codes the proxy itself produces. */
export const GRPC_STATUS = {
  OK: 0,
  CANCELLED: 1,
  RESOURCE_EXHAUSTED: 8,
  PERMISSION_DENIED: 7,
  INTERNAL: 13,
  UNAVAILABLE: 14,
  UNAUTHENTICATED: 16,
} as const;

const RESET_NAMES = ['NO_ERROR', 'PROTOCOL_ERROR', 'INTERNAL_ERROR', 'FLOW_CONTROL_ERROR', 'SETTINGS_TIMEOUT', 'STREAM_CLOSED',
  'FRAME_SIZE_ERROR', 'REFUSED_STREAM', 'CANCEL', 'COMPRESSION_ERROR', 'CONNECT_ERROR', 'ENHANCE_YOUR_CALM', 'INADEQUATE_SECURITY', 'HTTP_1_1_REQUIRED'];

/** An HTTP/2 error code (RST_STREAM, GOAWAY) by its RFC 9113 name, or `code N` for one it does not define. */
export function h2ErrorName(code: number): string {
  return RESET_NAMES[code] ?? `code ${code}`;
}

/** The gRPC status a client derives from an RST_STREAM code (gRPC over HTTP/2 spec, "Errors"). */
export function statusForReset(rstCode: number): { status: number; name: string } {
  const name = h2ErrorName(rstCode);
  switch (name) {
    case 'REFUSED_STREAM':
      return { status: GRPC_STATUS.UNAVAILABLE, name };
    case 'CANCEL':
      return { status: GRPC_STATUS.CANCELLED, name };
    case 'ENHANCE_YOUR_CALM':
      return { status: GRPC_STATUS.RESOURCE_EXHAUSTED, name };
    case 'INADEQUATE_SECURITY':
      return { status: GRPC_STATUS.PERMISSION_DENIED, name };
    default:
      return { status: GRPC_STATUS.INTERNAL, name };
  }
}

/**
 * grpc-message is percent-encoded outside printable ASCII and for `%` itself
 * (gRPC over HTTP/2 spec); anything else would be mangled by clients.
 */
export function encodeGrpcMessage(message: string): string {
  let out = '';
  for (const byte of Buffer.from(message, 'utf8')) {
    out += byte >= 0x20 && byte <= 0x7e && byte !== 0x25 ? String.fromCharCode(byte) : '%' + byte.toString(16).toUpperCase().padStart(2, '0');
  }
  return out;
}

/** Headers of a Trailers-Only gRPC response carrying an error. */
export function grpcErrorHeaders(code: number, message: string): Record<string, string | number> {
  return {
    ':status': 200,
    'content-type': 'application/grpc',
    'grpc-status': String(code),
    'grpc-message': encodeGrpcMessage(message),
  };
}

const TIMEOUT_UNIT_MS: Readonly<Record<string, number>> = { H: 3_600_000, M: 60_000, S: 1000, m: 1, u: 1e-3, n: 1e-6 };

/** A grpc-timeout value (1 to 8 digits and a unit, gRPC over HTTP/2) in milliseconds; undefined when absent or malformed. */
export function grpcTimeoutMs(value: unknown): number | undefined {
  if (typeof value !== 'string') return undefined;
  const match = /^(\d{1,8})([HMSmun])$/.exec(value);
  if (!match) return undefined;
  return Number(match[1]) * TIMEOUT_UNIT_MS[match[2]!]!;
}

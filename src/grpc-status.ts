/** gRPC status codes the proxy itself produces. */
export const GRPC_STATUS = {
  OK: 0,
  CANCELLED: 1,
  UNAVAILABLE: 14,
} as const;

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

/**
 * Request paths mapped to a bounded set of metric labels. Clients pick the
 * paths (model names, versions, query strings, junk), and every distinct
 * label value is a new time series in Prometheus: so names become
 * placeholders and anything unknown shares one label.
 */
import { ABSOLUTE_FORM } from './addresses.js';

export const OTHER_ROUTE = '{other}';

/**
 * Methods OVMS serves (FINDINGS), plus the test suite's Echo service. Methods,
 * not just services: a client may call any method name of a known service
 * (the server answers UNIMPLEMENTED), and each one would be a new series.
 */
const GRPC_METHODS = new Set([
  ...['ServerLive', 'ServerReady', 'ModelReady', 'ServerMetadata', 'ModelMetadata', 'ModelInfer', 'ModelStreamInfer'].map((m) => `/inference.GRPCInferenceService/${m}`),
  ...['Predict', 'GetModelMetadata'].map((m) => `/tensorflow.serving.PredictionService/${m}`),
  ...['GetModelStatus', 'HandleReloadConfigRequest'].map((m) => `/tensorflow.serving.ModelService/${m}`),
  ...['Unary', 'ClientStream', 'ServerStream', 'Bidi', 'Hold'].map((m) => `/ovmsmtls.test.Echo/${m}`),
]);

/** `/package.Service/Method` for the methods above, else {other}. */
export function grpcRoute(path: string): string {
  return GRPC_METHODS.has(path) ? path : OTHER_ROUTE;
}

const SEGMENT = '[^/]+';
const VERSION = `(?:/versions/${SEGMENT})?`;

/** OpenAI-style endpoints OVMS serves under /v3 (and /v3/v1). */
const OPENAI_ENDPOINTS = [
  'chat/completions', 'completions', 'embeddings', 'rerank', 'models',
  'images/generations', 'images/edits', 'audio/transcriptions', 'audio/translations', 'audio/speech',
];

interface RouteRule {
  readonly pattern: RegExp;
  readonly label: (match: RegExpExecArray) => string;
}

const fixed = (label: string) => () => label;

const REST_RULES: readonly RouteRule[] = [
  { pattern: /^\/v2\/health\/(live|ready)$/, label: (m) => `/v2/health/${m[1]}` },
  { pattern: /^\/v2\/?$/, label: fixed('/v2') },
  {
    pattern: new RegExp(`^/v2/models/${SEGMENT}(${VERSION})(/ready|/infer)?$`),
    label: (m) => `/v2/models/{model}${m[1] ? '/versions/{version}' : ''}${m[2] ?? ''}`,
  },
  { pattern: /^\/v1\/config(\/reload)?$/, label: (m) => `/v1/config${m[1] ?? ''}` },
  { pattern: /^\/metrics$/, label: fixed('/metrics') },
  {
    pattern: new RegExp(`^/v1/models/[^/:]+(${VERSION})(/metadata|:predict|:classify|:regress)?$`),
    label: (m) => `/v1/models/{model}${m[1] ? '/versions/{version}' : ''}${m[2] ?? ''}`,
  },
  {
    pattern: new RegExp(`^/v3(/v1)?/(${OPENAI_ENDPOINTS.join('|')})$`),
    label: (m) => `/v3${m[1] ?? ''}/${m[2]}`,
  },
];

/** A REST request target (with or without query) as a route label. */
export function restRoute(target: string): string {
  // Both REST modes forward an absolute-form target (http://host/v2/...), which the model server serves by its path: labelled by that path.
  const path = target.replace(ABSOLUTE_FORM, '').split('?', 1)[0] ?? '';
  for (const rule of REST_RULES) {
    const match = rule.pattern.exec(path);
    if (match) return rule.label(match);
  }
  return OTHER_ROUTE;
}

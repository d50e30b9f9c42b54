/**
 * The connection to the webchat service: gRPC-Web under the widget's own path
 * (`{endpoint}/w/{widget id}`), where the server answers CORS for the widget's allowed
 * origins. Binary gRPC-Web because it is the smaller encoding and the server speaks it.
 *
 * The visitor token travels in `authorization: Visitor <token>`, added by one interceptor, so
 * no call site can forget it and nothing goes into cookies. Errors are read once here into a
 * `Failure` (the gRPC code plus the `google.rpc.ErrorInfo` reason every Hafen error carries),
 * because the widget branches on reasons, never on messages.
 */

import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { ErrorInfoSchema } from "./gen/google/rpc/error_details_pb";
import { VisitorService } from "./gen/hafen/webchat/v1/webchat_pb";
import type { Strings } from "./i18n";

export { Code };

export type Visitor = Client<typeof VisitorService>;

export interface Api {
  readonly client: Visitor;
  setToken(token: string | null): void;
}

/**
 * Options for every unary call. The live stream has no deadline (the server ends it after an
 * hour), so the timeout is not the transport's default.
 */
export const CALL = { timeoutMs: 20_000 } as const;

export function connect(endpoint: string, widgetId: string): Api {
  let token: string | null = null;
  const auth: Interceptor = (next) => (req) => {
    if (token !== null) {
      req.header.set("authorization", `Visitor ${token}`);
    }
    return next(req);
  };
  const transport = createGrpcWebTransport({
    baseUrl: `${endpoint}/w/${encodeURIComponent(widgetId)}`,
    useBinaryFormat: true,
    interceptors: [auth],
  });
  return {
    client: createClient(VisitorService, transport),
    setToken(value) {
      token = value;
    },
  };
}

/** What went wrong with a call, as the widget decides on it. */
export interface Failure {
  code: Code;
  /** The ErrorInfo reason ("AGENT_UNAVAILABLE", …), or "" when the error carried none. */
  reason: string;
  metadata: Record<string, string>;
}

export function failure(err: unknown): Failure {
  const error = ConnectError.from(err);
  const info = error.findDetails(ErrorInfoSchema)[0];
  return { code: error.code, reason: info?.reason ?? "", metadata: info?.metadata ?? {} };
}

/**
 * What to tell the visitor about a failure no caller handled by its reason. Network failures
 * reach here as UNKNOWN or UNAVAILABLE, deadlines as DEADLINE_EXCEEDED: all "try again".
 */
export function errorText(f: Failure, t: Strings): string {
  switch (f.code) {
    case Code.Unavailable:
    case Code.Unknown:
    case Code.DeadlineExceeded:
    case Code.Canceled:
      return t.errorUnavailable;
    case Code.ResourceExhausted:
      return t.errorRateLimited(retryAfterSeconds(f));
    case Code.NotFound:
    case Code.PermissionDenied:
      return t.errorNotFound;
    case Code.InvalidArgument:
      return f.reason === "BODY_TOO_LARGE" ? t.errorTooLarge : t.errorInvalid;
    default:
      return f.reason === "LEGAL_HOLD_ACTIVE" ? t.legalHold : t.errorGeneric;
  }
}

/** The wait a RATE_LIMITED error asks for, in seconds (0 when it names none). */
export function retryAfterSeconds(f: Failure): number {
  const seconds = Number.parseInt(f.metadata["retry_after_seconds"] ?? "", 10);
  return Number.isFinite(seconds) && seconds > 0 ? seconds : 0;
}

export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
    function done() {
      clearTimeout(timer);
      resolve();
    }
  });
}

/**
 * Runs `call` again while it fails with UNAVAILABLE (the service or the network for a moment),
 * after the given waits. Only for calls that are safe to repeat: reads, and sends that carry
 * the same request_id each time, which the server answers with the first result.
 */
export async function retryUnavailable<T>(
  call: () => Promise<T>,
  waits: readonly number[] = [500, 1500],
): Promise<T> {
  for (const wait of waits) {
    try {
      return await call();
    } catch (err) {
      if (failure(err).code !== Code.Unavailable) {
        throw err;
      }
    }
    await sleep(wait);
  }
  return call();
}

/**
 * A request_id for SendVisitorMessage. crypto.randomUUID exists only in secure contexts; a page
 * served over plain http still gets a random version-4 UUID from getRandomValues.
 */
export function newRequestId(): string {
  if (typeof crypto.randomUUID === "function") {
    return crypto.randomUUID();
  }
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = ((bytes[6] ?? 0) & 0x0f) | 0x40;
  bytes[8] = ((bytes[8] ?? 0) & 0x3f) | 0x80;
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

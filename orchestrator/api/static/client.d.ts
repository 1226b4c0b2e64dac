// Types for /static/client.js, the orchestrator JavaScript client.

export type Queue = "train" | "generate";
export type JobStatus = "queued" | "running" | "completed" | "failed" | "cancelled" | "timed_out";
export type FinalStatus = "completed" | "failed" | "cancelled" | "timed_out";

export interface Artifact {
  /** Relative to the API's base URL (`/artifacts/...`); works in `<img src>` without headers. */
  url: string;
  contentType: string;
  bytes: number;
}

export interface JobResult {
  artifacts: Artifact[];
  [field: string]: unknown; // task fields: finalLoss, steps (lora); width, height (image); seconds (sleep)
}

export interface JobError {
  code: "TASK_ERROR" | "TIMEOUT" | "WORKER_LOST" | "PROVIDER_ERROR" | "CANCELLED" | string;
  message: string;
}

export interface Job<I = Record<string, unknown>> {
  jobId: string;
  type: string;
  queue: Queue;
  status: JobStatus;
  /** 0..100, never goes down within an attempt; 100 on completed. */
  progress: number;
  message: string | null;
  input: I;
  result: JobResult | null;
  error: JobError | null;
  attempts: number;
  /** The seq of the job's latest event. */
  seq: number;
  etaSeconds?: number | null;
  credits: { charged: number; refunded: number };
  createdAt: string;
  startedAt: string | null;
  finishedAt: string | null;
  updatedAt: string;
  webhookUrl: string | null;
  links: { self: string; events: string; stream: string; ws: string };
}

/** One change of a job: the same object over WebSocket, SSE, webhooks, polling and history. */
export interface JobEvent {
  jobId: string;
  /** Numbered per job from 1, no gaps. */
  seq: number;
  type: "status" | "progress" | "log";
  status: JobStatus;
  progress: number;
  message: string | null;
  /** progress: e.g. {step, loss} (lora), {step} (image), {tick} (sleep); final `completed`: {result}. */
  data: ({ result?: JobResult } & Record<string, unknown>) | null;
  error: JobError | null;
  actor?: string;
  etaSeconds?: number | null;
  ts: string;
}

/** First message of every (re)subscription: the job as it is now. */
export interface SubscribedMessage {
  type: "subscribed";
  jobId: string;
  job: Job;
}

/** The job cannot be followed (NOT_FOUND for unknown or foreign jobs, UNAUTHORIZED, ...). */
export interface SubscriptionError {
  type: "error";
  jobId: string;
  code: string;
  message: string;
}

export type SubscriptionMessage = SubscribedMessage | JobEvent | SubscriptionError;

/**
 * "open": the socket delivers; "polling": the fallback delivers (the socket is probed in the
 * background); "unauthorized": the API key or subscribe token is refused (bad, expired, revoked);
 * "error": the token route answered an error. The client keeps retrying from every state but
 * "idle"; `client.error` says why.
 */
export type ConnectionState = "idle" | "connecting" | "open" | "reconnecting" | "polling" | "unauthorized" | "error";

/** Why the connection is not delivering: `code` is the API's (UNAUTHORIZED, NOT_FOUND, ...), or
 * NETWORK_ERROR / TOKEN_FAILED / HTTP_<status> from the client; `status` 0 when there was no answer. */
export interface ConnectionError {
  code: string;
  message: string;
  status: number;
  /** Set when one job cannot be followed (NOT_FOUND: unknown, another user's, or not in the token). */
  jobId?: string;
}

type Secret = string | null | undefined | (() => string | null | undefined | Promise<string | null | undefined>);

export interface ClientOptions {
  /** The API's origin, e.g. "https://orchestrator.example.com"; "" (default) = same origin. */
  baseUrl?: string;
  /** The API key (or a function returning it). Used as `Authorization: Bearer` for REST calls. */
  token?: Secret;
  /**
   * Where the socket's subscribe token comes from. Default: POST /api/tokens with `token`.
   * Give a function calling your own backend to keep the API key off the browser; it may return
   * the token string, the `{token, expiresAt}` answer of POST /api/tokens, or the fetch
   * `Response` of your route (an error answer in the API's shape, `{"error": {"code",
   * "message"}}`, becomes the client's error with that status and code). It is called for every
   * connect with the ids of the jobs the socket will carry. A token minted without `jobIds`
   * covers every job of its user, later ones too: new jobs join the open socket. A token scoped
   * to `jobIds` makes a job subscribed later cost one reconnect with a new token.
   */
  subscribeToken?:
    | string
    | ((
        scope: { jobIds: string[] },
      ) => string | null | undefined | Response | Promise<string | { token: string; expiresAt?: string } | Response | null | undefined>);
  /**
   * "auto" (default): WebSocket, falling back to polling after `maxSocketFailures` sockets that
   * never opened; "websocket": never fall back; "poll": no socket at all. Polling long-polls
   * GET /api/jobs/{id}?waitSeconds=&afterSeq= and reads GET /api/jobs/{id}/events?after=
   * (needs `token`); with only `subscribeToken` it reads the SSE stream instead.
   */
  transport?: "auto" | "websocket" | "poll";
  /** Consecutive failed socket opens before falling back to polling (default 3). */
  maxSocketFailures?: number;
  /** waitSeconds of each long-poll (default 20). */
  pollWaitSeconds?: number;
  /** ttlSeconds asked of POST /api/tokens (default 600); a fresh token is fetched for every connect. */
  tokenTtlSeconds?: number;
  /** Client pings; a socket silent for this + 10 s is replaced (default 25000, 0 = off). */
  pingIntervalMs?: number;
  /** Reconnect backoff: exponential from initialMs to maxMs, with jitter (defaults 250, 10000);
   * also the pace of the socket probes while on the fallback. */
  backoff?: { initialMs?: number; maxMs?: number };
  /** Retries of a failed token fetch, on their own schedule (defaults 1000, 30000). */
  tokenBackoff?: { initialMs?: number; maxMs?: number };
  /** Custom fetch (e.g. to add `cache: "no-store"` in Next.js 14 server code). */
  fetch?: typeof fetch;
  /** Custom WebSocket / EventSource constructors (tests, Node < 22). */
  WebSocket?: typeof WebSocket;
  EventSource?: typeof EventSource;
}

export interface SubmitOptions {
  /** Task type; defaults to "lora" on train and "image" on generate. */
  type?: string;
  webhookUrl?: string;
  webhookEvents?: JobStatus[];
  /** Sent as the Idempotency-Key header: a retry with the same key and body returns the same job. */
  idempotencyKey?: string;
  signal?: AbortSignal;
}

export interface ListParams {
  status?: JobStatus;
  type?: string;
  queue?: Queue;
  /** 1..100, default 20. */
  limit?: number;
  cursor?: string | null;
  signal?: AbortSignal;
}

export interface JobList {
  jobs: Job[];
  nextCursor: string | null;
}

export interface TaskType {
  type: string;
  queue: Queue;
  cost: number;
  timeoutSeconds: number;
  /** JSON Schema (pydantic) of `input`, camelCase properties. */
  inputSchema: {
    type: "object";
    properties: Record<string, Record<string, unknown>>;
    required?: string[];
    [k: string]: unknown;
  };
}

export interface Me {
  userId: string;
  name: string;
  credits: number;
}

export interface SubscribeOptions {
  /** Deliver only events with seq > since (resume where you left off). Default 0: the whole history. */
  since?: number;
}

export interface WaitOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
  onEvent?: (msg: SubscriptionMessage, job: Job | null) => void;
}

export declare class OrchestratorError extends Error {
  /** HTTP status; 0 for client-side errors (NETWORK_ERROR, NO_API_KEY, TIMEOUT, ...). */
  status: number;
  /** The API's UPPER_SNAKE code, e.g. VALIDATION_ERROR, INSUFFICIENT_CREDITS, JOB_FINISHED. */
  code: string;
  details?: unknown;
  /** Seconds, from Retry-After (429). */
  retryAfter?: number;
  constructor(status: number, code: string, message: string, details?: unknown, retryAfter?: number);
}

export interface OrchestratorClient {
  readonly baseUrl: string;
  /** POST /api/{queue}: answers at once with the queued job (202). */
  submit<I = Record<string, unknown>>(queue: Queue, input: I, opts?: SubmitOptions): Promise<Job<I>>;
  /** GET /api/jobs/{id}; with waitSeconds + afterSeq it long-polls. */
  get(jobId: string, opts?: { waitSeconds?: number; afterSeq?: number; signal?: AbortSignal }): Promise<Job>;
  /** GET /api/jobs: your jobs, newest first; pass `nextCursor` back as `cursor` for the next page. */
  list(params?: ListParams): Promise<JobList>;
  /** DELETE /api/jobs/{id}: the cancelled job; OrchestratorError 409 JOB_FINISHED if it already ended. */
  cancel(jobId: string, opts?: { signal?: AbortSignal }): Promise<Job>;
  /** GET /api/jobs/{id}/events?after=: the stored history. */
  events(jobId: string, opts?: { after?: number; signal?: AbortSignal }): Promise<{ events: JobEvent[] }>;
  types(opts?: { signal?: AbortSignal }): Promise<{ types: TaskType[] }>;
  me(opts?: { signal?: AbortSignal }): Promise<Me>;
  /** POST /api/tokens: a short-lived subscribe-only token. */
  createToken(opts?: { jobIds?: string[]; ttlSeconds?: number; signal?: AbortSignal }): Promise<{ token: string; expiresAt: string }>;
  /**
   * Follow a job live. `onEvent` first gets a `subscribed` message with the job (again after every
   * reconnect), then every event with seq > since exactly once and in order, up to the final one.
   * All subscriptions of a client share one socket, opened with the first and closed after the
   * last unsubscribe. Returns the unsubscribe function (idempotent).
   */
  subscribe(jobId: string, onEvent: (msg: SubscriptionMessage) => void, opts?: SubscribeOptions): () => void;
  /** Resolves with the job (folded from its events) when it reaches a final status. */
  wait(jobId: string, opts?: WaitOptions): Promise<Job>;
  /** Ends every subscription and closes the socket. */
  close(): void;
  /** Connection state changes; returns a function removing the listener. */
  onStateChange(listener: (state: ConnectionState, error: ConnectionError | null) => void): () => void;
  /** Every error the connection meets (token refused, token route failing, job not found). */
  onError(listener: (error: ConnectionError) => void): () => void;
  readonly state: ConnectionState;
  /** The last error while not delivering; null once the socket opens. */
  readonly error: ConnectionError | null;
  /** What subscriptions currently use. */
  readonly transport: "websocket" | "poll" | "sse";
  /** Internals for tests and debugging; not a stable API. */
  readonly _debug: {
    stats: {
      socketsCreated: number;
      socketsClosed: number;
      tokensFetched: number;
      tokenFailures: number;
      messages: number;
      reconnects: number;
      polls: number;
      probes: number;
    };
    readonly socket: WebSocket | null;
    readonly subscriptions: { jobId: string; handles: number; since: number | null }[];
    drop(code?: number): void;
  };
}

export declare function createClient(options?: ClientOptions): OrchestratorClient;
export default createClient;

/** Folds a subscription message into a job (returns a new object; older events are ignored). */
export declare function applyEvent(job: Job | null, msg: SubscriptionMessage): Job | null;
export declare function isFinal(status: string): status is FinalStatus;
export declare function isFinalEvent(evt: unknown): evt is JobEvent & { type: "status"; status: FinalStatus };
export declare const FINAL_STATUSES: readonly FinalStatus[];

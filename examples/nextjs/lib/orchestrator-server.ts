// lib/orchestrator-server.ts  (server only)
import "server-only";
import { createClient } from "./orchestrator.js";

export const orchestrator = createClient({
  baseUrl: process.env.ORCH_URL!, // e.g. http://orchestrator:8080
  token: process.env.ORCH_API_KEY!,
  // Next 14 caches server-side fetch by default: opt out
  fetch: (url, init) => fetch(url, { ...init, cache: "no-store" }),
});

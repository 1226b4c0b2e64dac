// lib/orchestrator-browser.ts
"use client";
import { createClient, type OrchestratorClient } from "./orchestrator.js";

let client: OrchestratorClient | null = null;

export function browserClient(): OrchestratorClient {
  client ??= createClient({
    baseUrl: process.env.NEXT_PUBLIC_ORCH_URL!, // the orchestrator as the browser sees it
    // the route's Response as it is: {token, expiresAt}, or an error in the API's shape that
    // the client reports (state "unauthorized" on 401/403, "error" otherwise) and retries
    subscribeToken: ({ jobIds }) =>
      fetch("/api/orchestrator-token", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ jobIds }),
      }),
  });
  return client;
}

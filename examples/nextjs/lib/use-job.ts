// lib/use-job.ts
"use client";
import { useEffect, useState } from "react";
import {
  applyEvent,
  type ConnectionError,
  type ConnectionState,
  type Job,
  type JobEvent,
} from "@/lib/orchestrator.js";
import { browserClient } from "@/lib/orchestrator-browser";

export interface UseJob {
  job: Job | null; // the job resource, folded from the snapshot and every event
  event: JobEvent | null; // the latest event
  data: Record<string, unknown> | null; // the latest progress event's data, e.g. {step, loss}
  state: ConnectionState; // "open", "polling", "reconnecting", "unauthorized", "error", ...
  error: ConnectionError | null; // why this job is not followed (bad token, not found, ...)
}

export function useJob(jobId: string | null): UseJob {
  const [job, setJob] = useState<Job | null>(null);
  const [event, setEvent] = useState<JobEvent | null>(null);
  const [data, setData] = useState<Record<string, unknown> | null>(null);
  const [state, setState] = useState<ConnectionState>(() => browserClient().state);
  const [error, setError] = useState<ConnectionError | null>(null);

  useEffect(() => {
    const client = browserClient();
    return client.onStateChange((s, e) => {
      setState(s);
      if (s === "unauthorized" || s === "error") setError(e);
      else if (s === "open") setError(null);
    });
  }, []);

  useEffect(() => {
    if (!jobId) return;
    setJob(null);
    setEvent(null);
    setData(null);
    setError(null);
    // the client dedupes by seq and resumes after drops; unsubscribing closes the shared
    // socket once no component follows a job any more
    return browserClient().subscribe(jobId, (msg) => {
      if (msg.type === "error") {
        setError({ code: msg.code, message: msg.message, status: 0, jobId });
        return;
      }
      setJob((current) => applyEvent(current, msg));
      if (msg.type === "subscribed") return;
      setEvent(msg);
      if (msg.type === "progress" && msg.data) setData(msg.data);
    });
  }, [jobId]);

  return { job, event, data, state, error };
}

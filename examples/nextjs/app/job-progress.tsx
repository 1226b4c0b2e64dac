// app/job-progress.tsx
"use client";
import { useJob } from "@/lib/use-job";

export function JobProgress({ jobId }: { jobId: string }) {
  const { job, data, state, error } = useJob(jobId);
  if (error) return <p role="alert">{error.code}: {error.message}</p>;
  if (!job) return <p>Connecting… ({state})</p>;
  const image = job.result?.artifacts.find((a) => a.contentType.startsWith("image/"));
  const note = job.message && job.message !== job.status ? ` · ${job.message}` : "";
  return (
    <div>
      <progress max={100} value={job.progress} /> {job.status}{note}
      {typeof data?.loss === "number" && <span> · loss {data.loss.toFixed(4)}</span>}
      {state !== "open" && <small> ({state})</small>}
      {image && <img src={process.env.NEXT_PUBLIC_ORCH_URL + image.url} alt="" />}
      {job.error && <p>{job.error.code}: {job.error.message}</p>}
    </div>
  );
}

"use client";
import { useEffect, useState } from "react";
import { useJob } from "@/lib/use-job";

/** The live loss of a training job, from each progress event's `data.loss`. */
export function LossChart({ jobId }: { jobId: string }) {
  const { data } = useJob(jobId);
  const [points, setPoints] = useState<number[]>([]);
  useEffect(() => {
    if (typeof data?.loss === "number") setPoints((p) => [...p, data.loss as number]);
  }, [data]);
  if (points.length < 2) return null;
  const max = Math.max(...points);
  const min = Math.min(...points);
  const span = max - min || 1;
  const path = points.map((v, i) => `${(i / (points.length - 1)) * 300},${100 - ((v - min) / span) * 100}`).join(" ");
  return (
    <svg width={300} height={100} role="img" aria-label="loss">
      <polyline points={path} fill="none" stroke="currentColor" />
    </svg>
  );
}

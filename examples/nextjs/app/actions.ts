// app/actions.ts
"use server";
import { orchestrator } from "@/lib/orchestrator-server";

export async function generateImage(prompt: string) {
  const job = await orchestrator.submit("generate", { prompt });
  // remember job.jobId for the signed-in user here (your database)
  return job.jobId;
}

export async function trainLora(name: string) {
  const job = await orchestrator.submit("train", { name, steps: 60 });
  return job.jobId;
}

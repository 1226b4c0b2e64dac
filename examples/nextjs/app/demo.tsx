"use client";
import { useState } from "react";
import { generateImage, trainLora } from "./actions";
import { JobProgress } from "./job-progress";
import { LossChart } from "./loss-chart";

/** A LoRA's name allows letters, digits, `-` and `_`. */
const loraName = (text: string) => text.replace(/[^A-Za-z0-9_-]+/g, "-").slice(0, 64) || "lora";

export function Demo() {
  const [jobIds, setJobIds] = useState<string[]>([]);
  const [prompt, setPrompt] = useState("a red fox");
  const add = (id: string) => setJobIds((ids) => [id, ...ids]);
  return (
    <>
      <form action={async () => add(await generateImage(prompt))}>
        <input value={prompt} onChange={(e) => setPrompt(e.target.value)} aria-label="prompt" />
        <button type="submit">Generate</button>
        <button type="button" onClick={async () => add(await trainLora(loraName(prompt)))}>
          Train
        </button>
      </form>
      {jobIds.map((id) => (
        <section key={id} data-job={id}>
          <JobProgress jobId={id} />
          <LossChart jobId={id} />
        </section>
      ))}
    </>
  );
}

import { Demo } from "./demo";

// the API key stays on the server (lib/orchestrator-server.ts); the page gets subscribe tokens only
export const dynamic = "force-dynamic";

export default function Page() {
  return (
    <main>
      <h1>orchestrator × Next.js</h1>
      <Demo />
    </main>
  );
}

// app/api/orchestrator-token/route.ts
import { orchestrator } from "@/lib/orchestrator-server";

export async function POST(req: Request) {
  const { jobIds } = (await req.json()) as { jobIds: string[] };
  // check that the signed-in user owns every job in jobIds (your database); if not:
  //   return Response.json({ error: { code: "FORBIDDEN", message: "not your job" } }, { status: 403 });
  try {
    const { token, expiresAt } = await orchestrator.createToken({ jobIds, ttlSeconds: 300 });
    return Response.json({ token, expiresAt });
  } catch (err) {
    // answer in the API's error shape: the browser client shows this code and message
    const e = err as { status?: number; code?: string; message?: string };
    return Response.json(
      { error: { code: e.code ?? "TOKEN_FAILED", message: e.message ?? "could not mint a token" } },
      { status: e.status && e.status >= 400 ? e.status : 502 },
    );
  }
}

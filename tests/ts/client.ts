// A Node backend's client of the gateway, typed by `openapi-typescript` (its defaults) from /openapi.json.
// tests/gateway/test_openapi_typescript.py generates api.d.ts beside a copy of it and runs `tsc --noEmit` on this file:
// if the document lies about a field (required where it is optional, a string where it is an enum…), this
// stops compiling.
import createClient from "openapi-fetch";
import type { components, paths } from "./api";

type JobStatus = components["schemas"]["JobStatus"];
type JobResult = components["schemas"]["JobResult"];
type Problem = components["schemas"]["ProblemDetails"];
type TaskType = components["schemas"]["TaskType"];

declare const VARCO_KEY: string; // the backend's API key, from its own configuration

const api = createClient<paths>({ baseUrl: "http://localhost:8000", headers: { Authorization: `Bearer ${VARCO_KEY}` } });

function explain(problem: Problem): string {
  // detail is always sent; field and index only when they apply; state and error on a 409 about the job.
  const where = problem.field !== undefined ? ` (field ${problem.field})` : "";
  const failed = problem.error !== undefined ? `: ${problem.error.type}: ${problem.error.message}` : "";
  return `${problem.status} ${problem.title}: ${problem.detail}${where}${failed} [${problem.state ?? "-"}]`;
}

export async function submit(imageUri: string, task: TaskType): Promise<string> {
  // The minimal body: every other field is optional.
  const { data, error } = await api.POST("/v1/jobs", {
    body: { image_uri: imageUri, task, metadata: { photo: 81 } },
    params: { header: { "Idempotency-Key": "photo-81" } },
  });
  if (error !== undefined) throw new Error(explain(error));
  return data.job_id;
}

export async function submitBatch(): Promise<string[]> {
  const { data, error } = await api.POST("/v1/jobs/batch", {
    body: { jobs: [{ image_uri: "https://example.com/a.png", task: "ocr" },
                   { image_uri: "https://example.com/b.png", task: "vqa", prompt: "몇 명이 있나요?" }] },
  });
  if (error !== undefined) throw new Error(`${explain(error)} at #${error.index ?? "-"}`);
  return data.job_ids;
}

export async function poll(jobId: string): Promise<JobStatus> {
  for (;;) {
    const { data, error } = await api.GET("/v1/jobs/{job_id}", { params: { path: { job_id: jobId } } });
    if (error !== undefined) throw new Error(explain(error));
    // Always sent (null when unset): no `?` in the generated type.
    const finished: string | null = data.finished_at;
    const task: TaskType | null = data.task;
    if (data.state === "succeeded" || data.state === "failed" || data.state === "cancelled") {
      console.log(task, finished, data.attempts, data.error?.message ?? "");
      return data;
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

export async function result(jobId: string) {
  const { data, error } = await api.GET("/v1/jobs/{job_id}/result", {
    params: { path: { job_id: jobId }, query: { wait: 30 } },
  });
  if (error !== undefined) throw new Error(explain(error));
  const first = data.output.objects[0];
  console.log(data.task, data.finish_reason, first?.label, first?.boxes_px?.[0], data.image.kept_uri);
  const whole: Pick<JobResult, "job_id" | "model" | "metadata"> = data;
  return whole;
}

export async function cancel(jobId: string): Promise<JobStatus | Problem> {
  const { data, error } = await api.DELETE("/v1/jobs/{job_id}", { params: { path: { job_id: jobId } } });
  return data ?? error;
}

export async function* events(jobId: string): AsyncGenerator<JobStatus> {
  // EventSource cannot send the Authorization header: read the stream with fetch and parse its frames.
  const { response, error } = await api.GET("/v1/jobs/{job_id}/events", {
    params: { path: { job_id: jobId } },
    parseAs: "stream",
  });
  if (error !== undefined || response.body === null) throw new Error(`events: ${response.status}`);
  const decoder = new TextDecoder();
  let buffered = "";
  for await (const chunk of response.body as unknown as AsyncIterable<Uint8Array>) {
    buffered += decoder.decode(chunk, { stream: true });
    let end: number;
    while ((end = buffered.indexOf("\n\n")) >= 0) {
      const frame = buffered.slice(0, end);
      buffered = buffered.slice(end + 2);
      const lines = frame.split("\n");
      const event = lines.find((line) => line.startsWith("event: "))?.slice(7);
      const data = lines.find((line) => line.startsWith("data: "))?.slice(6);
      if (event === "end") return; // the job is finished: do not reconnect
      if (event === "interrupted") throw new Error(`events interrupted: ${data}`); // reconnect with Last-Event-ID
      if (event === "status" && data !== undefined) yield JSON.parse(data) as JobStatus;
    }
  }
}

export async function main(): Promise<void> {
  const jobId = await submit("https://example.com/cat.png", "grounding");
  for await (const status of events(jobId)) console.log(status.state);
  const status = await poll(jobId);
  if (status.state === "succeeded") await result(jobId);
  await submitBatch();
}

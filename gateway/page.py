"""`GET /ui/jobs/{id}`: a small page showing a job's status, overlay and parsed objects or OCR lines.

Authentication: `?key=<api key>` or an `Authorization: Bearer` header is answered with a 303 to the
same page with `?token=`, a token signed for this job only and expiring in 15 minutes (auth.py);
the page's own requests (status, events, result, overlay) carry that token, because an <img> or an
EventSource cannot send headers. The key thus leaves the address bar at once, never reaches the
page's sub-requests, and the access log redacts `key` and `token` query values (server.py). A
backend can also fetch the 303's Location with its key and hand the tokenised link to a user.
"""

from __future__ import annotations

import json
import secrets
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from varco.gateway.access import ANONYMOUS, Bearer, JobId, failures_limited, key_from_bearer, owned_status, rate_limit
from varco.gateway.label_font import font_path
from varco.gateway.problems import Problem, responses
from varco.gateway.state import gateway

router = APIRouter(tags=["page"])

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="referrer" content="no-referrer">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>varco job __JOB__</title>
<style nonce="__NONCE__">
@font-face{font-family:"Noto Sans KR";font-display:swap;
src:local("Noto Sans KR"),local("NotoSansKR-Regular"),url("../fonts/__FONT__") format("opentype");
unicode-range:__FONT_RANGE__}
body{font:15px/1.4 system-ui,sans-serif,"Noto Sans KR";margin:1.5rem;max-width:70rem;color:#222}
[hidden]{display:none!important}
#state{font-weight:bold} .failed,.cancelled{color:#b00} .succeeded{color:#070}
img{max-width:100%;border:1px solid #ccc;display:block;margin:1rem 0}
table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left}
code{background:#f4f4f4;padding:0 .2rem}
dl{display:grid;grid-template-columns:max-content auto;gap:.1rem 1rem} dt{color:#666} dd{margin:0}
</style></head><body>
<h1>Job <code id="job"></code></h1>
<p>State: <span id="state">loading…</span> <span id="error"></span></p>
<dl><dt>Task</dt><dd id="task">–</dd><dt>Prompt</dt><dd id="prompt">–</dd>
<dt>Created</dt><dd id="created_at">–</dd><dt>Started</dt><dd id="started_at">–</dd>
<dt>Finished</dt><dd id="finished_at">–</dd><dt>Attempts</dt><dd id="attempts">–</dd>
<dt>Raw JSON</dt><dd><a id="status-json">status</a> <a id="result-json" hidden>result</a></dd></dl>
<img id="overlay" alt="the image with its result drawn on it" hidden>
<p id="text"></p>
<table id="items" hidden><thead><tr><th>#</th><th id="what">label</th><th>box (pixels)</th></tr></thead>
<tbody></tbody></table>
<script nonce="__NONCE__">
const config = __CONFIG__;
const q = config.token ? "?token=" + encodeURIComponent(config.token) : "";
const base = "../../v1/jobs/" + encodeURIComponent(config.job_id);
const $ = (id) => document.getElementById(id);
$("job").textContent = config.job_id;
$("status-json").href = base + q;
let done = false;

function when(iso) {  // the viewer's local time; the exact stored value on hover
  const cell = document.createElement("time");
  cell.dateTime = cell.title = iso;
  cell.textContent = new Date(iso).toLocaleString();
  return cell;
}

function show(status) {
  $("state").textContent = status.state;
  $("state").className = status.state;
  if (status.error) $("error").textContent = status.error.type + ": " + status.error.message;
  if (status.task) $("task").textContent = status.task;
  $("attempts").textContent = String(status.attempts);
  for (const name of ["created_at", "started_at", "finished_at"]) {
    if (status[name]) $(name).replaceChildren(when(status[name]));
  }
  if (["succeeded", "failed", "cancelled"].includes(status.state) && !done) {
    done = true;
    if (status.state === "succeeded") loadResult();
  }
}

async function loadResult() {
  const response = await fetch(base + "/result" + q);
  if (!response.ok) { $("error").textContent = "result: HTTP " + response.status; return; }
  const result = await response.json();
  $("prompt").textContent = result.prompt;  // as sent to the model, task tags included
  $("result-json").href = base + "/result" + q;
  $("result-json").hidden = false;
  $("text").textContent = result.output.text;
  const rows = [];
  for (const o of result.output.objects) for (const box of (o.boxes_px || o.boxes)) rows.push([o.label, box]);
  for (const item of result.output.ocr) rows.push([item.text, item.box_px || item.box]);
  $("what").textContent = result.output.ocr.length ? "text" : "label";
  const body = $("items").tBodies[0];
  rows.forEach(([label, box], i) => {
    const tr = body.insertRow();
    for (const value of [String(i + 1), label, box.join(", ")]) tr.insertCell().textContent = value;
  });
  $("items").hidden = rows.length === 0;
  $("overlay").src = base + "/overlay.png" + q;
  $("overlay").hidden = false;
}

const events = new EventSource(base + "/events" + q);
events.addEventListener("status", (e) => {
  show(JSON.parse(e.data));
  if (done) events.close();
});
events.addEventListener("end", () => events.close());  // the job is finished: no reconnect
events.onerror = () => {
  if (done) { events.close(); return; }
  // Cut short (`interrupted`, a lost connection): EventSource reconnects by itself with Last-Event-ID,
  // and gets the events after it. Meanwhile read the state once.
  fetch(base + q).then((r) => r.ok ? r.json() : null).then((s) => { if (s) show(s); if (done) events.close(); });
};
</script></body></html>
"""


# The overlay's font, served for the page's text: a viewer without a Korean font sees Hangul, not tofu.
# Only text in these ranges (Hangul jamo, compatibility jamo and syllables, CJK punctuation, ideographs,
# full-width forms) makes a browser fetch it (4.6 MB, cached for a year): a page in Latin script never does.
FONT_FILE = "NotoSansKR-Regular.otf"
_FONT_RANGE = "U+1100-11FF,U+3000-303F,U+3130-318F,U+A960-A97F,U+AC00-D7FF,U+4E00-9FFF,U+F900-FAFF,U+FF00-FFEF"


def render(job_id: str, token: str | None) -> HTMLResponse:
    nonce = secrets.token_urlsafe(16)
    # JSON inside <script>: escape "<" so no value can close the element.
    config = json.dumps({"job_id": job_id, "token": token}).replace("<", "\\u003c")
    html = _PAGE.replace("__NONCE__", nonce).replace("__CONFIG__", config).replace("__JOB__", job_id)
    html = html.replace("__FONT__", FONT_FILE).replace("__FONT_RANGE__", _FONT_RANGE)
    csp = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; img-src 'self'; "
        "font-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    headers = {"Content-Security-Policy": csp, "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
    return HTMLResponse(html, headers=headers)


@router.get(
    "/ui/jobs/{job_id}", response_class=HTMLResponse, summary="A page showing the job; open it with ?key=",
    responses={303: {"description": "to the same page with a job-scoped token instead of the key"},
               **responses(401, 404, 422, 429)},
)  # fmt: skip
async def job_page(
    request: Request, job_id: JobId, credentials: Bearer,
    key: Annotated[str | None, Query(max_length=500, description="an API key (exchanged for a token)")] = None,
    token: Annotated[str | None, Query(max_length=200, description="the page token from the redirect")] = None,
) -> Response:  # fmt: skip
    state = gateway(request)
    if state.keys is None:  # --no-auth
        rate_limit(state, ANONYMOUS)
        await owned_status(state, job_id, "")
        return render(job_id, None)
    # A valid token is honoured even beside a Bearer header: redirecting it again would loop forever for a
    # client that keeps its header on redirects. A bad token beside a key falls back to the key.
    token_of = state.keys.verify_page_token(token, job_id) if token is not None and key is None else None
    by_token = token_of is not None
    with failures_limited(request):
        if token_of is not None:
            who = token_of
        elif token is not None and credentials is None and key is None:
            raise Problem(401, "unauthorized", "page token is invalid or expired: open the page with ?key= again")
        elif key is not None and credentials is None:
            who = state.keys.match(key)
            if who is None:
                raise Problem(401, "unauthorized", "unknown API key")
        else:
            who = key_from_bearer(state, credentials)
    rate_limit(state, who)
    await owned_status(state, job_id, who)
    if by_token:
        return render(job_id, token)
    url = f"/ui/jobs/{quote(job_id)}?token={quote(state.keys.page_token(who, job_id))}"
    return RedirectResponse(url, status_code=303, headers={"Referrer-Policy": "no-referrer"})


@router.get(
    f"/ui/fonts/{FONT_FILE}", response_class=FileResponse, summary="The job page's webfont (Noto Sans KR, OFL 1.1)",
    responses={200: {"description": "OpenType font", "content": {"font/otf": {}}}},
)  # fmt: skip
async def page_font() -> FileResponse:
    # Public and never changing with a release of the font package: no key, cached for a year.
    return FileResponse(font_path(), media_type="font/otf",
                        headers={"Cache-Control": "public, max-age=31536000, immutable"})  # fmt: skip

"""The review page's HTML: plain server-rendered pages, one stylesheet and one small script
inline (no CDN, no JavaScript library: the hospital network reaches nothing outside)."""

from __future__ import annotations

import datetime as _dt
from html import escape
from typing import Any

from radpilot.v1 import orchestrator_pb2 as pb
from radpilot.v1 import types_pb2

COMPARATORS = {types_pb2.COMPARATOR_AT_MOST: "≤", types_pb2.COMPARATOR_AT_LEAST: "≥"}
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
           "#17becf", "#bcbd22", "#7f7f7f"]  # fmt: skip
STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#1d3557;color:#fff;padding:.6em 1.2em;display:flex;justify-content:space-between}
header a,header button{color:#fff}
main{padding:1em 1.2em;max-width:1400px}
table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
td.pass{background:#d8f3dc}td.fail{background:#ffd6d6}
.note{background:#fff3bf;padding:.5em;border:1px solid #e9c46a}
.error{background:#ffd6d6;padding:.5em;border:1px solid #e63946}
section{background:#fff;border:1px solid #ddd;padding:.8em;margin:.8em 0}
#events{max-height:12em;overflow:auto;font-family:monospace;font-size:12px}
.grid{display:flex;gap:1em;flex-wrap:wrap}
textarea{width:100%;min-height:4em}
"""
SCRIPT = """
function toggleIteration(box){
  document.querySelectorAll('g[data-iteration="'+box.value+'"]').forEach(
    g => { g.style.display = box.checked ? '' : 'none'; });
}
function showSlice(){
  const img = document.getElementById('slice');
  const it = document.getElementById('slice-iteration').value;
  const z = document.getElementById('slice-index').value;
  img.src = img.dataset.base + '/iterations/' + it + '/slices/' + z + '.png';
  document.getElementById('slice-label').textContent = 'slice ' + (Number(z) + 1);
}
function refresh(part){
  fetch(location.pathname + '/' + part).then(r => r.text()).then(html => {
    document.getElementById(part).innerHTML = html;
  });
}
function watch(){
  const log = document.getElementById('events');
  if (!log || log.dataset.live !== '1' || !window.EventSource) return;
  const source = new EventSource(location.pathname + '/events');
  source.onmessage = (m) => {
    const e = JSON.parse(m.data);
    const line = document.createElement('div');
    line.textContent = e.text;
    log.appendChild(line);
    log.scrollTop = log.scrollHeight;
    if (e.kind === 'evaluated' || e.kind === 'proposal' || e.done) refresh('iterations');
    if (e.done) { source.close(); refresh('state'); refresh('dvh'); }
  };
  source.onerror = () => { source.close(); };
}
window.addEventListener('load', watch);
"""


def page(title: str, body: str, logged_in: bool = True, note: str = "", error: str = "") -> str:
    logout = (
        '<form method="post" action="/logout"><button>Log out</button></form>' if logged_in else ""
    )
    banner = f'<p class="note" id="note">{escape(note)}</p>' if note else ""
    banner += f'<p class="error" id="error">{escape(error)}</p>' if error else ""
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}'
        f" · RadPilot review</title><style>{STYLE}</style><script>{SCRIPT}</script></head>"
        f'<body><header><span><a href="/jobs">RadPilot review</a> · {escape(title)}</span>'
        f"{logout}</header><main>{banner}{body}</main></body></html>"
    )


def login_page(error: str = "") -> str:
    body = (
        "<section><h2>Log in</h2><p>Give the API token of this RadPilot installation.</p>"
        '<form method="post" action="/login"><input type="password" name="token" id="token" '
        'autocomplete="current-password" size="40" required> <button id="login">Log in</button>'
        "</form></section>"
    )
    return page("Log in", body, logged_in=False, error=error)


def _state(state: int) -> str:
    return pb.JobState.Name(state).removeprefix("JOB_STATE_").lower()


def _when(seconds: float) -> str:
    return _dt.datetime.fromtimestamp(seconds, _dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def jobs_page(jobs: list[pb.JobSummary]) -> str:
    rows = "".join(
        f'<tr><td><a href="/jobs/{escape(j.job_id)}">{escape(j.job_id[:8])}</a></td>'
        f"<td>{escape(j.case_id)}</td><td>{escape(j.protocol)}</td><td>{escape(j.agent)}</td>"
        f'<td class="state">{_state(j.state)}</td><td>{j.iterations}</td>'
        f"<td>{j.best_iteration or ''}</td><td>{_when(j.created)}</td></tr>"
        for j in jobs
    )
    body = (
        '<section><h2>Planning jobs</h2><table id="jobs"><tr><th>job</th><th>case</th>'
        "<th>protocol</th><th>agent</th><th>state</th><th>iterations</th><th>best</th>"
        f"<th>started</th></tr>{rows}</table>"
        + ("" if jobs else "<p>No jobs yet.</p>")
        + "</section>"
    )
    return page("Jobs", body)


def state_fragment(job: pb.GetPlanningJobResponse) -> str:
    error = f" — {escape(job.error)}" if job.error else ""
    best = f", best iteration {job.best_iteration}" if job.best_iteration else ""
    return (
        f'<span id="job-state">{_state(job.state)}</span>{error}; case {escape(job.case_id)}, '
        f"{len(job.iterations)} iteration(s){best}"
    )


def _goal_label(g: types_pb2.ClinicalGoal) -> str:
    unit = "%" if g.metric.upper().startswith("V") else "Gy"
    return f"{g.structure} {g.metric} {COMPARATORS.get(g.comparator, '?')} {g.limit:g} {unit}"


def iterations_fragment(job: pb.GetPlanningJobResponse) -> str:
    """The goals table (a column per iteration, pass/fail colours) and each iteration's
    findings, rationale and the physician's feedback it was given."""
    its = list(job.iterations)
    if not its:
        return "<p>No iteration yet.</p>"
    labels: list[str] = []
    for r in its:
        for gr in r.goals:
            label = _goal_label(gr.goal)
            if label not in labels:
                labels.append(label)
    head = "".join(
        f"<th>{r.iteration}{' ★' if r.iteration == job.best_iteration else ''}</th>" for r in its
    )
    rows = []
    for label in labels:
        cells = []
        for r in its:
            hit = next((gr for gr in r.goals if _goal_label(gr.goal) == label), None)
            if hit is None:
                cells.append("<td></td>")
            else:
                css = "pass" if hit.passed else "fail"
                cells.append(f'<td class="{css}">{hit.achieved:.2f}</td>')
        rows.append(f"<tr><th>{escape(label)}</th>{''.join(cells)}</tr>")
    table = (
        f'<table id="goals"><tr><th>goal \\ iteration</th>{head}</tr>{"".join(rows)}</table>'
        "<p>Green: goal met; red: missed. ★ the best plan by the protocol's priorities.</p>"
    )
    details = []
    for r in its:
        findings = "".join(f"<li>{escape(f)}</li>" for f in r.findings)
        feedback = (
            f'<p class="feedback">Physician: {escape(r.physician_feedback)}</p>'
            if r.physician_feedback
            else ""
        )
        details.append(
            f'<details id="iteration-{r.iteration}"><summary>Iteration {r.iteration}: '
            f"{escape(r.decision or '')} — FMO {r.fmo.seconds:.1f} s</summary>{feedback}"
            f"<ul>{findings}</ul><p><b>Planner:</b> {escape(r.rationale)}</p></details>"
        )
    return table + "".join(details)


def dvh_fragment(views: list[pb.GetIterationViewResponse], best: int) -> str:
    """Every iteration's DVH in one SVG (a group per iteration, toggled by its checkbox; the
    best and the last shown at first), a colour per structure, a dash pattern per iteration."""
    if not views:
        return "<p>No dose yet.</p>"
    w, h, left, bottom, top = 640, 360, 50, 30, 10
    top_gy = max((v.levels_gy[-1] for v in views if v.levels_gy), default=1.0)

    def x(gy: float) -> float:
        return left + (w - left - 10) * gy / top_gy

    def y(pct: float) -> float:
        return top + (h - bottom - top) * (1 - pct / 100)

    names: list[str] = []
    for v in views:
        names += [c.structure for c in v.dvh if c.structure not in names]
    shown = {best or views[-1].iteration, views[-1].iteration}
    groups, boxes = [], []
    for k, v in enumerate(views):
        dash = "" if v.iteration == best else f' stroke-dasharray="{2 + 2 * (k % 4)},3"'
        lines = []
        for c in v.dvh:
            pts = " ".join(
                f"{x(g):.1f},{y(p):.1f}" for g, p in zip(v.levels_gy, c.volume_pct, strict=False)
            )
            colour = PALETTE[names.index(c.structure) % len(PALETTE)]
            lines.append(
                f'<polyline fill="none" stroke="{colour}" stroke-width="1.5"{dash} points="{pts}">'
                f"<title>{escape(c.structure)}, iteration {v.iteration}</title></polyline>"
            )
        hidden = "" if v.iteration in shown else ' style="display:none"'
        groups.append(f'<g data-iteration="{v.iteration}"{hidden}>{"".join(lines)}</g>')
        checked = " checked" if v.iteration in shown else ""
        boxes.append(
            f'<label><input type="checkbox" class="dvh-toggle" value="{v.iteration}"{checked} '
            f'onchange="toggleIteration(this)"> {v.iteration}'
            f"{' ★' if v.iteration == best else ''}</label> "
        )
    ticks = "".join(
        f'<text x="{x(g):.0f}" y="{h - 10}" font-size="10" text-anchor="middle">{g:g}</text>'
        for g in range(0, int(top_gy) + 1, max(10, int(top_gy) // 8 // 10 * 10 or 10))
    )
    yticks = "".join(
        f'<text x="{left - 5}" y="{y(p) + 4:.0f}" font-size="10" text-anchor="end">{p}</text>'
        for p in range(0, 101, 20)
    )
    legend = " ".join(
        f'<span style="color:{PALETTE[i % len(PALETTE)]}">■ {escape(n)}</span>'
        for i, n in enumerate(names)
    )
    return (
        f'<svg id="dvh-svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
        f'aria-label="DVH"><rect x="{left}" y="{top}" width="{w - left - 10}" '
        f'height="{h - bottom - top}" '
        f'fill="none" stroke="#999"/>{ticks}{yticks}{"".join(groups)}</svg>'
        f"<p>Volume (%) against dose (Gy). {legend}</p><p>Iterations: {''.join(boxes)} "
        "(solid: the best plan; dashed: the others)</p>"
    )


def job_page(
    job: pb.GetPlanningJobResponse,
    views: list[pb.GetIterationViewResponse],
    start: pb.GetIterationViewResponse | None,
    csrf: str,
    note: str = "",
    error: str = "",
) -> str:
    jid = escape(job.job_id)
    if start is not None:
        options = "".join(
            f'<option value="{r.iteration}"{" selected" if r.iteration == start.iteration else ""}>'
            f"iteration {r.iteration}</option>"
            for r in job.iterations
        )
        slices = (
            f'<p><label>Plan <select id="slice-iteration" onchange="showSlice()">{options}'
            f'</select></label> <label>Axial slice <input type="range" id="slice-index" min="0" '
            f'max="{start.num_slices - 1}" value="{start.start_slice}" oninput="showSlice()">'
            f'</label> <span id="slice-label">slice {start.start_slice + 1}</span> of '
            f"{start.num_slices} (it opens on the slice through the global maximum)</p>"
            f'<img id="slice" data-base="/jobs/{jid}" alt="dose slice" '
            f'src="/jobs/{jid}/iterations/{start.iteration}/slices/{start.start_slice}.png">'
        )
    else:
        slices = "<p>No dose yet.</p>"
    done = job.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)
    actions = (
        f'<form method="post" action="/jobs/{jid}/feedback"><input type="hidden" name="csrf" '
        f'value="{escape(csrf)}"><p><label for="feedback">Comments for the next iterations '
        '(no patient identifiers):</label></p><textarea id="feedback" name="text" '
        'maxlength="2000" required></textarea><p><button id="send-feedback">Send feedback'
        "</button></p></form>"
        if not done
        else "<p>The job has ended: feedback applies to running jobs.</p>"
    )
    approve = (
        f'<form method="post" action="/jobs/{jid}/approve"><input type="hidden" name="csrf" '
        f'value="{escape(csrf)}"><p><label>Note for the reference library: <input '
        'name="description" id="approve-description" size="50" maxlength="500"></label> '
        '<button id="approve">Approve the best plan</button></p></form>'
        if job.state == pb.JOB_STATE_SUCCEEDED
        else "<p>Approval opens when the job has succeeded.</p>"
    )
    download = (
        f'<p><a id="download" href="/jobs/{jid}/export" download>Download the export</a> '
        "(report, images, summary.json, DICOM RTDOSE)</p>"
        if job.iterations
        else ""
    )
    body = (
        f'<section><h2>Job {jid[:8]}</h2><p id="state">{state_fragment(job)}</p>'
        f'<div id="events" data-live="{0 if done else 1}"></div></section>'
        f'<section><h3>Goals per iteration</h3><div id="iterations">{iterations_fragment(job)}'
        f"</div></section>"
        f'<div class="grid"><section><h3>DVH</h3><div id="dvh">'
        f"{dvh_fragment(views, job.best_iteration)}</div></section>"
        f"<section><h3>Dose</h3>{slices}</section></div>"
        f"<section><h3>Feedback</h3>{actions}</section>"
        f"<section><h3>Approval and export</h3>{approve}{download}</section>"
    )
    return page(f"Job {job.job_id[:8]}", body, note=note, error=error)


def event_text(e: pb.WatchPlanningResponse) -> dict[str, Any]:
    kind = pb.EventKind.Name(e.kind).removeprefix("EVENT_KIND_").lower()
    text = f"#{e.sequence} {kind}"
    if e.iteration:
        text += f", iteration {e.iteration}"
    if e.kind == pb.EVENT_KIND_EVALUATED and e.goals:
        met = sum(g.passed for g in e.goals)
        text += f": {met}/{len(e.goals)} goals met"
    if e.message:
        text += f": {e.message}"
    done = e.kind in (pb.EVENT_KIND_FINISHED, pb.EVENT_KIND_FAILED, pb.EVENT_KIND_CANCELLED)
    return {"sequence": e.sequence, "kind": kind, "iteration": e.iteration, "text": text,
            "done": done}  # fmt: skip

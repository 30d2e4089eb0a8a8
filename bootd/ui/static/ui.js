// bootd dashboard: the only script. It keeps the Rooms page live (server-sent events) and sends each
// action form as JSON to the admin API (the same handlers bootctl calls), with the session's CSRF token.
"use strict";
(function () {
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrf = csrfMeta ? csrfMeta.content : "";
  const statusBox = document.getElementById("status");

  function say(text, bad) {
    statusBox.textContent = text;
    statusBox.classList.toggle("bad", !!bad);
    statusBox.setAttribute("role", bad ? "alert" : "status");
  }

  function when(ts) {
    if (!ts) return "-";
    const d = new Date(ts * 1000), p = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  }

  // -- live tiles --------------------------------------------------------------------------------
  function recount(room) {
    room.querySelectorAll("[data-count]").forEach((c) => {
      const s = c.dataset.count;
      c.textContent = `${room.querySelectorAll(`.tile[data-state="${s}"]`).length} ${s}`;
    });
  }

  function applyTile(t) {
    const el = document.querySelector(`.tile[data-mac="${t.mac}"]`);
    if (!el) return false;
    el.className = `tile state-${t.state}`;
    el.dataset.state = t.state;
    el.querySelector(".t-state").textContent = t.state + (t.step ? ` · ${t.step}` : "");
    el.querySelector(".t-snap").textContent = t.snapshot || "no snapshot";
    el.querySelector(".t-boot").textContent = when(t.boot_started) +
      (t.last_boot_duration ? ` · ${t.last_boot_duration.toFixed(1)} s` : "");
    let err = el.querySelector(".t-error");
    if (t.state === "failed" && t.last_error) {
      if (!err) { err = document.createElement("span"); err.className = "t-error"; el.appendChild(err); }
      err.textContent = t.last_error;
    } else if (err) { err.remove(); }
    return true;
  }

  const live = document.getElementById("live-state");
  if (live && window.EventSource) {
    const source = new EventSource("/ui/events");
    source.addEventListener("open", () => { live.textContent = "connected"; });
    source.addEventListener("error", () => { live.textContent = "reconnecting…"; });
    source.addEventListener("logout", () => { source.close(); window.location = "/ui/login"; });
    source.addEventListener("tiles", (ev) => {
      let unknown = false;
      JSON.parse(ev.data).forEach((t) => { if (!applyTile(t)) unknown = true; });
      document.querySelectorAll("section.room").forEach(recount);
      live.textContent = `connected, updated ${when(Date.now() / 1000)}`;
      if (unknown) window.location.reload(); // a PC seen for the first time: draw its tile
    });
  }

  // -- actions -----------------------------------------------------------------------------------
  async function call(method, url, body) {
    const opts = { method, headers: { "X-CSRF-Token": csrf, "Accept": "application/json" }, credentials: "same-origin" };
    if (method !== "DELETE" && method !== "GET") {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body || {});
    }
    const resp = await fetch(url, opts);
    let data = {};
    try { data = await resp.json(); } catch (e) { data = { error: `${resp.status} ${resp.statusText}` }; }
    return { ok: resp.ok, status: resp.status, data };
  }

  function formBody(form) {
    const body = {};
    let url = form.dataset.api;
    new FormData(form).forEach((value, key) => {
      if (url.includes(`{${key}}`)) { url = url.replace(`{${key}}`, encodeURIComponent(value)); return; }
      const input = form.elements[key];
      const v = input && input.dataset && input.dataset.type === "int" ? parseInt(value, 10) : value;
      if (key.endsWith("[]")) { (body[key.slice(0, -2)] = body[key.slice(0, -2)] || []).push(v); } else { body[key] = v; }
    });
    return { url, body };
  }

  function plan(data) {
    const lines = [];
    for (const [k, v] of Object.entries(data)) {
      if (v === null || v === false || (Array.isArray(v) && !v.length)) continue;
      lines.push(`${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`);
    }
    return lines.join("\n");
  }

  async function watchJob(id) {
    const bar = document.createElement("progress");
    bar.max = 1; bar.value = 0; bar.setAttribute("aria-label", `job ${id}`);
    statusBox.textContent = `job ${id}: `; statusBox.appendChild(bar);
    for (;;) {
      const r = await call("GET", `/api/v1/snapshot-jobs/${id}`);
      if (!r.ok) { say(r.data.error, true); return; }
      bar.value = r.data.progress;
      if (r.data.state !== "running" && r.data.state !== "queued") {
        if (r.data.error) say(`job ${id} failed: ${r.data.error}`, true); else { say(`job ${id} done`); window.location.reload(); }
        return;
      }
      await new Promise((ok) => setTimeout(ok, 500));
    }
  }

  document.querySelectorAll("form.act").forEach((form) => {
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const method = form.dataset.method || "POST";
      const { url, body } = formBody(form);
      if (form.dataset.dryrun) {
        const dry = method === "DELETE" ? await call("DELETE", `${url}?dry_run=1`) : await call(method, url, { ...body, dry_run: true });
        if (!dry.ok) { say(dry.data.error, true); return; }
        if (!window.confirm(`This will remove:\n${plan(dry.data)}\n\nGo ahead?`)) { say("nothing done"); return; }
      } else if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
        say("nothing done"); return;
      }
      say("working…");
      const r = await call(method, url, body);
      if (!r.ok) { say(`refused (${r.status}): ${r.data.error}`, true); return; }
      if (form.dataset.job && r.data.job) { await watchJob(r.data.job.id); return; }
      say("done");
      window.setTimeout(() => window.location.reload(), 600);
    });
  });
})();

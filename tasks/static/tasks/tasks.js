/* /admin/tasks/: one controller per task panel, talking to the task JSON API.
 *
 * Live updates: an EventSource on runs/<id>/events ("snapshot", "progress", "status");
 * if the stream errors, poll runs/<id> every 2 s instead. When the page drives kicks
 * (PICSITE_ADMIN_PAGE_DRIVES_KICKS), it also POSTs runs/<id>/kick about every 4.5 s
 * while a run is active, one at a time. A viewer without the run_tasks permission
 * (data-can-run="false") gets no start/cancel/retry controls and never kicks.
 * Batch runs (explicit ids; any number beside the library run) each get a card with a tile
 * per requested item, live from their own EventSource ("items" snapshot, then "item" per
 * change; the browser's reconnects send Last-Event-ID, so nothing is missed), and their
 * finish records with the callback deliveries. New batches are found every 5 s.
 * Vanilla JS, no build step.
 */
(function () {
  "use strict";

  var ACTIVE = ["queued", "running", "cancelling", "paused"];
  var FINISHED = ["succeeded", "failed", "cancelled"];
  var POLL_MS = 2000;
  var KICK_EVERY_MS = 4500;
  var DETAIL_THROTTLE_MS = 1500;
  var DETAIL_REFRESH_MS = 5000;
  var PREVIEW_DEBOUNCE_MS = 300;
  var BATCH_DISCOVER_MS = 5000;
  var DELIVERY_REFRESH_MS = 5000;
  var ITEM_PAGE = 500;

  var root = document.querySelector("[data-testid=tasks-page]");
  if (!root) return;
  var DRIVES_KICKS = root.getAttribute("data-drives-kicks") === "true";
  var CAN_RUN = root.getAttribute("data-can-run") === "true";
  var PAGE_TOKEN = root.getAttribute("data-csrf-token") || "";

  // --- helpers ----------------------------------------------------------------------

  function csrfToken() {
    var m = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    return m ? decodeURIComponent(m[1]) : PAGE_TOKEN;
  }

  function ApiError(message, status, code, details) {
    this.message = message;
    this.status = status;
    this.code = code || "";
    this.details = details || null;
  }

  function api(base, path, method, body) {
    method = method || "GET";
    var opts = { method: method, credentials: "same-origin", headers: { Accept: "application/json" } };
    if (method !== "GET") opts.headers["X-CSRFToken"] = csrfToken();
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    return fetch(base + path, opts).then(
      function (resp) {
        return resp.text().then(function (text) {
          var data = null;
          try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
          if (!resp.ok) {
            var err = (data && data.error) || {};
            throw new ApiError(err.message || ("HTTP " + resp.status), resp.status, err.code, err.details);
          }
          return data;
        });
      },
      function (e) { throw new ApiError("network error: " + e.message, 0, "network"); }
    );
  }

  function isActive(run) { return !!run && ACTIVE.indexOf(run.status) >= 0; }
  function isFinished(run) { return !!run && FINISHED.indexOf(run.status) >= 0; }

  function fmtInt(n) { return (n === null || n === undefined) ? "—" : Number(n).toLocaleString(); }

  function fmtDuration(s) {
    if (s === null || s === undefined || !isFinite(s)) return "—";
    s = Math.max(0, Math.round(s));
    var h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    if (h) return h + "h " + String(m).padStart(2, "0") + "m";
    if (m) return m + "m " + String(sec).padStart(2, "0") + "s";
    return sec + "s";
  }

  function fmtBytes(b) {
    if (!b) return "0 B";
    var units = ["B", "KB", "MB", "GB", "TB"], i = 0;
    while (b >= 1000 && i < units.length - 1) { b /= 1000; i++; }
    return (i ? b.toFixed(1) : b) + " " + units[i];
  }

  function fmtRate(r) {
    if (!r) return "—";
    return (r >= 10 ? r.toFixed(1) : r >= 1 ? r.toFixed(2) : r.toFixed(3)) + " items/s";
  }

  function fmtTime(iso) {
    if (!iso) return "—";
    var d = new Date(iso);
    return isNaN(d) ? iso : d.toLocaleString();
  }

  function fmtScope(scope) {
    if (!scope || typeof scope !== "object") return "";
    var mode = scope.mode || "";
    if (scope.image_ids) return "ids: " + scope.image_ids.slice(0, 6).join(", ") + (scope.image_ids.length > 6 ? "…" : "");
    return mode || JSON.stringify(scope);
  }

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        if (k === "text") node.textContent = attrs[k];
        else if (k === "class") node.className = attrs[k];
        else node.setAttribute(k, attrs[k]);
      });
    }
    (children || []).forEach(function (c) { if (c) node.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
    return node;
  }

  var SVG_NS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs) {
    var node = document.createElementNS(SVG_NS, tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") node.textContent = attrs[k];
      else node.setAttribute(k, attrs[k]);
    });
    return node;
  }

  /** Parse "1, 2 3" into [1, 2, 3]; throws on anything else. */
  function parseIds(text) {
    var tokens = text.split(/[\s,;]+/).filter(Boolean);
    if (!tokens.length) throw new Error("enter at least one id");
    var seen = {}, out = [];
    tokens.forEach(function (t) {
      if (!/^\d+$/.test(t) || Number(t) <= 0) throw new Error("not an id: " + t);
      if (!seen[t]) { seen[t] = true; out.push(Number(t)); }
    });
    return out;
  }

  // --- one panel -----------------------------------------------------------------------

  function Panel(section) {
    this.section = section;
    this.key = section.getAttribute("data-task-key");
    this.base = section.getAttribute("data-api-base");
    this.active = null; // the active run (dict) or null
    this.viewed = null; // the run shown in the run/detail areas
    this.recent = [];
    this.count = null;
    this.scopeError = null;
    this.following = null; // run id whose live updates we follow
    this.es = null;
    this.pollTimer = null;
    this.kickTimer = null;
    this.kickInFlight = false;
    this.detailTimer = null;
    this.detailRefreshTimer = null;
    this.lastDetailAt = 0;
    this.previewTimer = null;
    this.previewSeq = 0;
    this.busy = false; // a button request is in flight
    this.liveMode = "—";
    this.activeRuns = [];
    this.batches = {}; // run id -> BatchCard
    this.discoverTimer = null;
  }

  Panel.prototype.q = function (role) { return this.section.querySelector("[data-role='" + role + "']"); };

  Panel.prototype.init = function () {
    var self = this;
    this.section.querySelectorAll("input[type=radio]").forEach(function (r) {
      r.addEventListener("change", function () { self.schedulePreview(0); });
    });
    var ids = this.q("ids");
    if (ids) {
      ids.addEventListener("input", function () {
        var radio = self.section.querySelector("input[type=radio][value='" + ids.getAttribute("data-field") + "']");
        if (radio && !radio.checked) radio.checked = true;
        self.schedulePreview(PREVIEW_DEBOUNCE_MS);
      });
      ids.addEventListener("focus", function () {
        var radio = self.section.querySelector("input[type=radio][value='" + ids.getAttribute("data-field") + "']");
        if (radio && !radio.checked) { radio.checked = true; self.schedulePreview(0); }
      });
    }
    var choice = this.q("choice");
    if (choice) choice.addEventListener("change", function () { self.schedulePreview(0); });
    if (CAN_RUN) {
      this.q("start").addEventListener("click", function () { self.start(); });
      this.q("cancel").addEventListener("click", function () { self.cancel(); });
      this.q("retry").addEventListener("click", function () { self.retry(); });
    }
    this.refreshRuns(true);
    this.schedulePreview(0);
    this.discoverTimer = setInterval(function () { self.discoverBatches(); }, BATCH_DISCOVER_MS);
  };

  // -- scope / preview

  Panel.prototype.selectedOption = function () {
    return this.section.querySelector("input[type=radio]:checked");
  };

  /** {scope, query} for the chosen radio; throws Error on bad explicit ids. */
  Panel.prototype.currentScope = function () {
    var radio = this.selectedOption();
    var name = radio ? radio.value : "";
    var kind = radio ? radio.getAttribute("data-kind") : "default";
    var scope = {}, query = "";
    if (kind === "bool") {
      scope[name] = true;
      query = encodeURIComponent(name) + "=true";
    } else if (kind === "int_list") {
      var ids = parseIds(this.q("ids").value);
      scope[name] = ids;
      query = encodeURIComponent(name) + "=" + ids.join(",");
    } else if (kind === "choice") {
      var value = this.q("choice").value;
      scope[name] = value;
      query = encodeURIComponent(name) + "=" + encodeURIComponent(value);
    }
    return { scope: scope, query: query };
  };

  Panel.prototype.currentBudget = function () {
    var budget = {};
    var items = this.q("budget-items").value.trim();
    var seconds = this.q("budget-seconds").value.trim();
    if (items) {
      var n = Number(items);
      if (!Number.isInteger(n) || n <= 0) throw new Error("budget items must be a positive whole number");
      budget.items = n;
    }
    if (seconds) {
      var s = Number(seconds);
      if (!isFinite(s) || s <= 0) throw new Error("budget seconds must be a positive number");
      budget.seconds = s;
    }
    return budget;
  };

  Panel.prototype.schedulePreview = function (delay) {
    var self = this;
    clearTimeout(this.previewTimer);
    this.previewTimer = setTimeout(function () { self.refreshPreview(); }, delay);
  };

  Panel.prototype.refreshPreview = function () {
    var self = this;
    var countEl = this.q("count"), estEl = this.q("estimate");
    var sel;
    try {
      sel = this.currentScope();
    } catch (e) {
      this.count = null;
      this.scopeError = e.message;
      countEl.textContent = "—";
      countEl.setAttribute("data-count", "");
      estEl.textContent = e.message;
      estEl.classList.add("tp-invalid");
      this.updateButtons();
      return;
    }
    this.scopeError = null;
    var seq = ++this.previewSeq;
    countEl.classList.add("tp-loading");
    api(this.base, "preview-count" + (sel.query ? "?" + sel.query : "")).then(
      function (data) {
        if (seq !== self.previewSeq) return;
        countEl.classList.remove("tp-loading");
        estEl.classList.remove("tp-invalid");
        self.count = Number(data.count);
        countEl.textContent = fmtInt(self.count);
        countEl.setAttribute("data-count", String(self.count));
        estEl.textContent = self.count > 0 ? self.describeEstimate(data.estimate || {}) : "nothing to do";
        // The task's own figures (variants-gc: objects and bytes to reclaim).
        if (data.details && data.details.summary) estEl.textContent += " — " + data.details.summary;
        self.updateButtons();
      },
      function (err) {
        if (seq !== self.previewSeq) return;
        countEl.classList.remove("tp-loading");
        self.count = null;
        self.scopeError = err.message;
        countEl.textContent = "—";
        countEl.setAttribute("data-count", "");
        estEl.textContent = err.message;
        estEl.classList.add("tp-invalid");
        self.updateButtons();
      }
    );
  };

  Panel.prototype.describeEstimate = function (est) {
    var parts = [];
    if (est.cpu_seconds !== undefined) parts.push("≈ " + fmtDuration(est.cpu_seconds) + " of work");
    if (est.bytes) parts.push(fmtBytes(est.bytes) + " written");
    if (est.object_writes) parts.push(fmtInt(est.object_writes) + " object writes");
    if (est.money !== undefined) parts.push("≈ $" + Number(est.money).toFixed(2));
    var text = parts.join(" · ");
    if (est.basis) text += " (" + (est.basis === "history" ? "from recent runs" : "default estimate") + ")";
    return text;
  };

  // -- runs list

  Panel.prototype.refreshRuns = function (first) {
    var self = this;
    return api(this.base, "runs").then(
      function (data) {
        self.recent = data.recent || [];
        // "active" lists every active run (batches first); the panel follows the library run.
        self.activeRuns = data.active || [];
        self.active = self.activeRuns.filter(function (r) { return r.kind !== "batch"; })[0] || null;
        self.showBatches(self.activeRuns);
        self.renderRecent();
        if (self.active) {
          if (!self.viewed || self.viewed.id === self.active.id || first) self.view(self.active);
          self.follow(self.active.id);
        } else {
          self.stopFollowing();
          if (!self.viewed && self.recent.length) self.view(self.recent[0]);
          else if (self.viewed) {
            var fresh = self.recent.filter(function (r) { return r.id === self.viewed.id; })[0];
            if (fresh) self.view(fresh);
          }
        }
        self.updateButtons();
      },
      function (err) { self.showError("Could not load runs: " + err.message); }
    );
  };

  Panel.prototype.renderRecent = function () {
    var self = this;
    var body = this.q("recent");
    body.textContent = "";
    if (!this.recent.length) {
      body.appendChild(el("tr", null, [el("td", { colspan: "9", class: "tp-empty", text: "No runs yet." })]));
      return;
    }
    this.recent.slice(0, 10).forEach(function (run) {
      var c = run.counters || {};
      var tr = el("tr", {
        class: "tp-row" + (self.viewed && self.viewed.id === run.id ? " tp-selected" : ""),
        "data-run-id": String(run.id),
        "data-testid": "run-row-" + run.id,
        tabindex: "0",
        title: "Show run #" + run.id,
      }, [
        el("td", { text: "#" + run.id }),
        el("td", null, [el("span", { class: "tp-status tp-status-" + run.status, text: run.status })]),
        el("td", { text: fmtScope(run.scope) }),
        el("td", { text: fmtInt(c.processed) + " / " + fmtInt(c.total) }),
        el("td", { text: fmtInt(c.succeeded) }),
        el("td", { text: fmtInt(c.skipped) }),
        el("td", { text: fmtInt(c.failed) }),
        el("td", { text: fmtTime(run.created_at) }),
        el("td", { text: fmtTime(run.finished_at) }),
      ]);
      var open = function () { self.select(run.id); };
      tr.addEventListener("click", open);
      tr.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(); } });
      body.appendChild(tr);
    });
  };

  /** Show a run from the table in the run and detail areas. */
  Panel.prototype.select = function (runId) {
    var self = this;
    if (this.active && this.active.id === runId) { this.view(this.active); this.loadDetail(runId); return; }
    api(this.base, "runs/" + runId).then(
      function (data) { self.view(data); self.renderDetail(data); },
      function (err) { self.showError("Could not load run #" + runId + ": " + err.message); }
    );
  };

  // -- showing a run

  Panel.prototype.view = function (run) {
    var changed = !this.viewed || this.viewed.id !== run.id;
    // Snapshots and list rows carry no timeline: keep the one from the last detail.
    if (!changed && !run.timeline && this.viewed.timeline) run.timeline = this.viewed.timeline;
    run._receivedAt = Date.now();
    this.viewed = run;
    this.renderRun();
    if (changed) {
      this.section.querySelectorAll("tr.tp-row").forEach(function (tr) {
        tr.classList.toggle("tp-selected", tr.getAttribute("data-run-id") === String(run.id));
      });
      this.q("detail").hidden = true;
      this.loadDetail(run.id);
    }
    this.updateButtons();
  };

  /** Elapsed seconds by the server's clock, advanced locally since the last fetch. */
  function elapsedOf(run) {
    var p = run.progress || {};
    var base = p.elapsed_seconds || 0;
    if (run.status === "running" && run.started_at && !run.finished_at && run._receivedAt) {
      base += (Date.now() - run._receivedAt) / 1000;
    }
    return base;
  }

  Panel.prototype.renderRun = function () {
    var run = this.viewed;
    if (!run) return;
    var c = run.counters || {};
    var total = c.total || 0, processed = c.processed || 0;
    var percent = total ? Math.min(100, (100 * processed) / total) : (isFinished(run) ? 100 : 0);
    percent = Math.round(percent * 10) / 10;
    this.q("run-title").textContent = "Run #" + run.id + " · " + fmtScope(run.scope);
    var status = this.q("status");
    status.textContent = run.status;
    status.setAttribute("data-status", run.status);
    status.className = "tp-status tp-status-" + run.status;
    this.q("pause-reason").textContent = run.status === "paused" && run.pause_reason ? "(" + run.pause_reason + " reached)" : "";
    var bar = this.q("bar");
    bar.setAttribute("aria-valuenow", String(percent));
    bar.setAttribute("data-status", run.status);
    this.q("bar-fill").style.width = percent + "%";
    this.q("percent").textContent = percent + "%";
    this.q("processed").textContent = fmtInt(processed) + " / " + fmtInt(total);
    this.q("succeeded").textContent = fmtInt(c.succeeded);
    this.q("skipped").textContent = fmtInt(c.skipped);
    this.q("failed").textContent = fmtInt(c.failed);
    this.q("failed").classList.toggle("tp-bad", (c.failed || 0) > 0);
    var elapsed = elapsedOf(run);
    var rate = elapsed > 0 && processed ? processed / elapsed : (run.progress && run.progress.items_per_second) || 0;
    this.q("rate").textContent = fmtRate(rate);
    var eta = null;
    if (isActive(run) && rate > 0) eta = Math.max(total - processed, 0) / rate;
    this.q("eta").textContent = isActive(run) ? fmtDuration(eta) : (run.status === "succeeded" ? "done" : "—");
    this.q("elapsed").textContent = elapsed ? fmtDuration(elapsed) : "—";
    this.q("live").textContent = this.following === run.id ? this.liveMode : "—";
    var lastError = this.q("last-error");
    lastError.textContent = run.last_error || "";
    lastError.hidden = !run.last_error;
    this.renderChart();
  };

  Panel.prototype.renderChart = function () {
    var run = this.viewed, chart = this.q("chart");
    chart.textContent = "";
    var W = 320, H = 80, PAD = 4;
    var points = (run && run.timeline ? run.timeline.slice() : []).filter(function (p) { return p && p.length >= 2; });
    if (run && isActive(run) && run.started_at && points.length) {
      // "Now" on the server's clock: start + elapsed (no reliance on this machine's clock).
      var now = Date.parse(run.started_at) / 1000 + elapsedOf(run);
      var last = points[points.length - 1];
      var processed = (run.counters || {}).processed || 0;
      if (now - last[0] >= 1) points.push([now, processed]);
    }
    var series = [];
    for (var i = 1; i < points.length; i++) {
      var dt = points[i][0] - points[i - 1][0];
      if (dt <= 0) continue;
      series.push([points[i][0], Math.max(0, (points[i][1] - points[i - 1][1]) / dt)]);
    }
    chart.setAttribute("data-points", String(series.length));
    chart.appendChild(svg("line", { x1: 0, y1: H - PAD, x2: W, y2: H - PAD, class: "tp-axis" }));
    if (series.length < 1) {
      chart.appendChild(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "tp-chart-empty",
        text: run && isActive(run) ? "collecting samples…" : "no throughput samples" }));
      return;
    }
    var t0 = points[0][0], t1 = series[series.length - 1][0];
    var maxRate = Math.max.apply(null, series.map(function (s) { return s[1]; })) || 1;
    var span = Math.max(t1 - t0, 1);
    var x = function (t) { return PAD + ((t - t0) / span) * (W - 2 * PAD); };
    var y = function (r) { return H - PAD - (r / maxRate) * (H - 2 * PAD - 10); };
    var coords = [[x(t0), y(0)]].concat(series.map(function (s) { return [x(s[0]), y(s[1])]; }));
    var d = coords.map(function (c) { return c[0].toFixed(1) + "," + c[1].toFixed(1); }).join(" ");
    chart.appendChild(svg("polygon", { points: d + " " + x(t1).toFixed(1) + "," + (H - PAD) + " " + x(t0).toFixed(1) + "," + (H - PAD), class: "tp-area" }));
    chart.appendChild(svg("polyline", { points: d, class: "tp-line", "data-testid": "chart-line" }));
    chart.appendChild(svg("text", { x: W - PAD, y: 11, "text-anchor": "end", class: "tp-chart-label",
      text: "peak " + fmtRate(maxRate) }));
  };

  // -- detail

  Panel.prototype.loadDetail = function (runId) {
    var self = this;
    this.lastDetailAt = Date.now();
    return api(this.base, "runs/" + runId).then(
      function (data) {
        if (self.active && self.active.id === data.id) self.applyRun(data);
        else if (self.viewed && self.viewed.id === data.id) { self.view(data); }
        if (self.viewed && self.viewed.id === data.id) self.renderDetail(data);
        return data;
      },
      function (err) { self.showError("Could not load run #" + runId + ": " + err.message); return null; }
    );
  };

  Panel.prototype.scheduleDetail = function () {
    var self = this;
    if (this.detailTimer || !this.following) return;
    var wait = Math.max(0, DETAIL_THROTTLE_MS - (Date.now() - this.lastDetailAt));
    this.detailTimer = setTimeout(function () {
      self.detailTimer = null;
      if (self.following) self.loadDetail(self.following);
    }, wait);
  };

  Panel.prototype.renderDetail = function (data) {
    var detail = this.q("detail");
    detail.hidden = false;
    detail.setAttribute("data-run-id", String(data.id));
    this.q("detail-title").textContent = "Run #" + data.id + " details";
    var issues = this.q("issues");
    issues.textContent = "";
    var list = data.recent_issues || [];
    if (!list.length) issues.appendChild(el("li", { class: "tp-empty", text: "No issues." }));
    list.forEach(function (issue) {
      issues.appendChild(el("li", { "data-code": issue.code || "" }, [
        el("code", { class: "tp-code", text: (issue.stage ? issue.stage + "/" : "") + (issue.code || "") }),
        " ",
        issue.item_id ? el("span", { class: "tp-item", text: "item " + issue.item_id + ": " }) : null,
        el("span", { text: issue.message || "" }),
        issue.final === false ? el("span", { class: "tp-help", text: " (attempt " + issue.attempt + ", will retry)" }) : null,
        " ",
        el("time", { class: "tp-help", datetime: issue.at || "", text: issue.at ? fmtTime(issue.at) : "" }),
      ]));
    });
    var body = this.q("failed-items");
    body.textContent = "";
    var items = data.failed_items || [];
    if (!items.length) {
      body.appendChild(el("tr", null, [el("td", { colspan: "7", class: "tp-empty", text: "No failed items." })]));
    }
    items.forEach(function (item) {
      var thumb = item.thumbnail_url
        ? el("img", { src: item.thumbnail_url, alt: "", loading: "lazy", class: "tp-thumb" })
        : el("span", { class: "tp-nothumb", text: "—" });
      body.appendChild(el("tr", { "data-testid": "failed-item-" + item.item_id, "data-item-id": String(item.item_id),
        "data-state": item.state || "", "data-code": item.code || "" }, [
        el("td", null, [thumb]),
        el("td", { text: String(item.item_id) }),
        el("td", { text: item.state + (item.state === "retrying" && item.next_attempt_at ? " at " + fmtTime(item.next_attempt_at) : "") }),
        el("td", { text: fmtInt(item.attempts) }),
        el("td", null, [el("code", { class: "tp-code", text: item.code || "" })]),
        el("td", { text: item.stage || "" }),
        el("td", { class: "tp-msg", text: item.message || "" }),
      ]));
    });
  };

  // -- live updates

  Panel.prototype.follow = function (runId) {
    if (this.following === runId) return;
    this.stopFollowing();
    this.following = runId;
    this.openStream(runId);
    if (DRIVES_KICKS) this.scheduleKick(0);
    var self = this;
    this.detailRefreshTimer = setInterval(function () {
      if (self.following && Date.now() - self.lastDetailAt >= DETAIL_REFRESH_MS - 100) self.loadDetail(self.following);
      else self.renderRun(); // keep elapsed/ETA ticking between events
    }, DETAIL_REFRESH_MS);
  };

  Panel.prototype.stopFollowing = function () {
    if (this.es) { this.es.close(); this.es = null; }
    clearTimeout(this.pollTimer); this.pollTimer = null;
    clearTimeout(this.kickTimer); this.kickTimer = null;
    clearTimeout(this.detailTimer); this.detailTimer = null;
    clearInterval(this.detailRefreshTimer); this.detailRefreshTimer = null;
    this.following = null;
    this.setLive("—");
  };

  Panel.prototype.setLive = function (mode) {
    this.liveMode = mode;
    this.section.setAttribute("data-live", mode);
    var seen = (this.section.getAttribute("data-live-seen") || "").split(" ").filter(Boolean);
    if (mode !== "—" && seen.indexOf(mode) < 0) this.section.setAttribute("data-live-seen", seen.concat([mode]).join(" "));
    var live = this.q("live");
    if (live) live.textContent = mode;
  };

  Panel.prototype.openStream = function (runId) {
    var self = this;
    if (!window.EventSource) { this.startPolling(runId); return; }
    var es;
    try {
      es = new EventSource(this.base + "runs/" + runId + "/events");
    } catch (e) {
      this.startPolling(runId);
      return;
    }
    this.es = es;
    this.setLive("connecting");
    var parse = function (e) { try { return JSON.parse(e.data); } catch (err) { return null; } };
    es.addEventListener("open", function () { if (self.es === es) self.setLive("stream"); });
    es.addEventListener("snapshot", function (e) {
      var d = parse(e);
      if (d && self.es === es) { self.setLive("stream"); self.applyRun(d.run || d); }
    });
    es.addEventListener("progress", function (e) { var d = parse(e); if (d && self.es === es) self.applyProgress(d); });
    es.addEventListener("status", function (e) { var d = parse(e); if (d && self.es === es) self.applyStatus(d); });
    es.onerror = function () {
      if (self.es !== es) return;
      es.close();
      self.es = null;
      // The stream ended or broke: poll instead (stops by itself once the run is over).
      if (self.following === runId) self.startPolling(runId);
    };
  };

  Panel.prototype.startPolling = function (runId) {
    var self = this;
    clearTimeout(this.pollTimer);
    this.setLive("polling");
    var tick = function () {
      if (self.following !== runId) return;
      self.loadDetail(runId).then(function () {
        if (self.following === runId) self.pollTimer = setTimeout(tick, POLL_MS);
      });
    };
    this.pollTimer = setTimeout(tick, 0);
  };

  /** A full run dict (snapshot, detail, kick/cancel/retry answers). */
  Panel.prototype.applyRun = function (run) {
    if (!run || run.id === undefined) return;
    if (run.kind === "batch") { this.showBatches([run]); return; }
    if (isActive(run)) {
      this.active = run;
      if (!this.viewed || this.viewed.id === run.id) this.view(run);
      this.follow(run.id);
      this.updateRecentRow(run);
    } else {
      if (this.viewed && this.viewed.id === run.id) this.view(run);
      if (this.recent.some(function (r) { return r.id === run.id; })) this.updateRecentRow(run);
      if (this.active && this.active.id === run.id) this.finished(run);
    }
    this.updateButtons();
  };

  Panel.prototype.applyProgress = function (d) {
    var run = this.active;
    if (!run || (d.run !== undefined && d.run !== run.id)) return;
    if (d.counters) run.counters = Object.assign({}, run.counters || {}, d.counters);
    if (d.status) run.status = d.status;
    if (this.viewed && this.viewed.id === run.id) { this.viewed = run; this.renderRun(); }
    this.updateRecentRow(run);
    this.scheduleDetail();
  };

  Panel.prototype.applyStatus = function (d) {
    var run = this.active;
    if (!run || (d.run !== undefined && d.run !== run.id)) return;
    if (d.status) run.status = d.status;
    if (this.viewed && this.viewed.id === run.id) this.renderRun();
    this.updateButtons();
    this.loadDetail(run.id); // the full run (counters, finished_at, last_error)
  };

  Panel.prototype.finished = function (run) {
    this.stopFollowing();
    this.active = null;
    this.updateButtons();
    this.loadDetail(run.id);
    this.refreshRuns(false);
    this.schedulePreview(0);
  };

  Panel.prototype.updateRecentRow = function (run) {
    var found = false;
    this.recent = this.recent.map(function (r) { if (r.id === run.id) { found = true; return run; } return r; });
    if (!found) this.recent.unshift(run);
    this.renderRecent();
  };

  // -- kicks (only when the page drives the run itself)

  Panel.prototype.scheduleKick = function (delay) {
    var self = this;
    clearTimeout(this.kickTimer);
    this.kickTimer = setTimeout(function () { self.kick(); }, delay);
  };

  Panel.prototype.kick = function () {
    var self = this;
    var run = this.active;
    if (!DRIVES_KICKS || !CAN_RUN || !run || !isActive(run) || this.kickInFlight) return;
    if (run.status === "paused") { this.scheduleKick(KICK_EVERY_MS); return; }
    var runId = run.id, startedAt = Date.now();
    this.kickInFlight = true;
    this.section.setAttribute("data-kicking", "true");
    api(this.base, "runs/" + runId + "/kick", "POST").then(
      function (data) { if (data) self.applyRun(data.run || data); },
      function (err) { if (err.status !== 409) self.showError("Kick failed: " + err.message, true); }
    ).then(function () {
      self.kickInFlight = false;
      self.section.setAttribute("data-kicking", "false");
      if (self.active && self.active.id === runId && self.following === runId) {
        self.scheduleKick(Math.max(250, KICK_EVERY_MS - (Date.now() - startedAt)));
      }
    });
  };

  // -- buttons

  Panel.prototype.updateButtons = function () {
    var active = this.active, viewed = this.viewed;
    this.section.setAttribute("data-active-run", active ? String(active.id) : "");
    if (!CAN_RUN) return; // no controls rendered
    var start = this.q("start"), cancel = this.q("cancel"), retry = this.q("retry");
    var chosen = this.selectedOption();
    var batch = !!chosen && chosen.getAttribute("data-kind") === "int_list"; // explicit ids: beside any run
    var blocked = !!active && !batch;
    start.disabled = this.busy || blocked || !this.count || this.count <= 0 || !!this.scopeError;
    start.title = blocked ? "Run #" + active.id + " is " + active.status : (this.count === 0 ? "Nothing in scope" : "");
    cancel.disabled = this.busy || !active || ["queued", "running", "paused"].indexOf(active.status) < 0;
    var failed = viewed && viewed.counters ? viewed.counters.failed || 0 : 0;
    retry.disabled = this.busy || !viewed || failed <= 0 || viewed.status === "cancelling" ||
      (!!active && active.id !== viewed.id);
    retry.textContent = failed > 0 ? "Retry failed (" + failed + ")" : "Retry failed";
  };

  Panel.prototype.withBusy = function (promise) {
    var self = this;
    this.busy = true;
    this.updateButtons();
    return promise.then(
      function (v) { self.busy = false; self.updateButtons(); return v; },
      function (e) { self.busy = false; self.updateButtons(); throw e; }
    );
  };

  Panel.prototype.start = function () {
    var self = this, sel, budget;
    try {
      sel = this.currentScope();
      budget = this.currentBudget();
    } catch (e) {
      this.showError(e.message);
      return;
    }
    this.clearError();
    var body = { scope: sel.scope };
    if (Object.keys(budget).length) body.budget = budget;
    this.withBusy(api(this.base, "runs", "POST", body)).then(
      function (data) {
        var run = (data && data.run) || data;
        if (run && run.kind === "batch") {
          self.showBatches([run]);
          if (run.missing && run.missing.length) self.showError("Not found (skipped): " + run.missing.join(", "), true);
          return;
        }
        self.viewed = null;
        self.applyRun(run);
        self.refreshRuns(false);
      },
      function (err) {
        self.showError(err.message + (err.code ? " [" + err.code + "]" : ""));
        self.refreshRuns(false);
        self.schedulePreview(0);
      }
    );
  };

  Panel.prototype.cancel = function () {
    var self = this, run = this.active;
    if (!run) return;
    this.clearError();
    this.withBusy(api(this.base, "runs/" + run.id + "/cancel", "POST")).then(
      function (data) { self.applyRun((data && data.run) || data); },
      function (err) { self.showError("Cancel failed: " + err.message); self.refreshRuns(false); }
    );
  };

  Panel.prototype.retry = function () {
    var self = this, run = this.viewed;
    if (!run) return;
    this.clearError();
    this.withBusy(api(this.base, "runs/" + run.id + "/retry-failed", "POST")).then(
      function (data) { self.applyRun((data && data.run) || data); self.refreshRuns(false); },
      function (err) { self.showError("Retry failed: " + err.message); self.refreshRuns(false); }
    );
  };

  Panel.prototype.showError = function (message, transient) {
    var box = this.q("error");
    box.textContent = message;
    box.hidden = false;
    clearTimeout(this.errorTimer);
    if (transient) this.errorTimer = setTimeout(function () { box.hidden = true; }, 8000);
  };

  Panel.prototype.clearError = function () {
    var box = this.q("error");
    box.hidden = true;
    box.textContent = "";
  };

  // --- batch runs -------------------------------------------------------------------

  /** Cards for these runs: active batch runs get one (a card already shown is updated). */
  Panel.prototype.showBatches = function (runs) {
    var self = this;
    runs.forEach(function (run) {
      if (run.kind !== "batch") return;
      var card = self.batches[run.id];
      if (card) { card.applyRun(run); return; }
      if (!isActive(run)) return; // finished before the page saw it: in Recent runs
      card = self.batches[run.id] = new BatchCard(self, run);
      card.open();
    });
    this.q("batches").hidden = !Object.keys(this.batches).length;
  };

  Panel.prototype.discoverBatches = function () {
    var self = this;
    if (document.hidden) return;
    api(this.base, "runs").then(function (data) {
      var active = data.active || [];
      self.showBatches(active);
      var library = active.filter(function (r) { return r.kind !== "batch"; })[0];
      if (library && !self.active) self.refreshRuns(false); // a library run started elsewhere
    }, function () { /* the next round retries */ });
  };

  Panel.prototype.dropBatch = function (runId) {
    var card = this.batches[runId];
    if (!card) return;
    card.close();
    card.node.remove();
    delete this.batches[runId];
    this.q("batches").hidden = !Object.keys(this.batches).length;
  };

  function BatchCard(panel, run) {
    this.panel = panel;
    this.run = run;
    this.tiles = {}; // item id -> tile
    this.items = {}; // item id -> item dict
    this.thumbs = {}; // item id -> thumbnail URL
    this.selected = null;
    this.es = null;
    this.pollTimer = null;
    this.kickTimer = null;
    this.deliveryTimer = null;
    this.closed = false;
    var self = this, id = run.id;
    this.statusEl = el("span", { class: "tp-status", "data-testid": "batch-status-" + id });
    this.countsEl = el("span", { class: "tp-help", "data-testid": "batch-counts-" + id });
    this.liveEl = el("span", { class: "tp-help", "data-testid": "batch-live-" + id, text: "connecting" });
    var dismiss = el("button", { type: "button", class: "button tp-dismiss", "data-testid": "batch-dismiss-" + id,
      text: "Dismiss", hidden: "hidden" });
    dismiss.addEventListener("click", function () { panel.dropBatch(id); });
    this.dismissEl = dismiss;
    this.grid = el("div", { class: "tp-batch-grid", "data-testid": "batch-grid-" + id, role: "list" });
    this.detailEl = el("p", { class: "tp-tile-detail", "data-testid": "batch-item-detail-" + id, hidden: "hidden" });
    this.deliveriesEl = el("div", { class: "tp-deliveries", "data-testid": "batch-deliveries-" + id });
    this.node = el("div", { class: "tp-batch", "data-testid": "batch-" + id, "data-run-id": String(id) }, [
      el("div", { class: "tp-batch-head" }, [
        el("strong", { text: "Batch #" + id }), this.statusEl, this.countsEl, this.liveEl, dismiss,
      ]),
      this.grid, this.detailEl, this.deliveriesEl,
    ]);
    panel.q("batch-list").prepend(this.node);
    this.applyRun(run);
  }

  BatchCard.prototype.open = function () {
    var self = this;
    this.loadThumbnails(null);
    this.loadDeliveries();
    this.openStream();
    if (DRIVES_KICKS && CAN_RUN) this.scheduleKick(0);
  };

  BatchCard.prototype.close = function () {
    this.closed = true;
    if (this.es) { this.es.close(); this.es = null; }
    clearTimeout(this.pollTimer);
    clearTimeout(this.kickTimer);
    clearTimeout(this.deliveryTimer);
    clearTimeout(this.thumbTimer);
  };

  BatchCard.prototype.applyRun = function (run) {
    if (!run || run.id !== this.run.id) return;
    this.run = Object.assign({}, this.run, run);
    run = this.run;
    var c = run.counters || {};
    this.node.setAttribute("data-status", run.status);
    this.statusEl.textContent = run.status;
    this.statusEl.className = "tp-status tp-status-" + run.status;
    var parts = [fmtInt(c.processed) + " / " + fmtInt(c.total) + " done"];
    if (c.failed) parts.push(fmtInt(c.failed) + " failed");
    var missing = Object.keys(this.items).filter(function (k) { return this.items[k].state === "missing"; }, this).length;
    if (missing) parts.push(missing + " missing");
    this.countsEl.textContent = parts.join(" · ");
    if (isFinished(run) && !this.finishedSeen) {
      this.finishedSeen = true;
      this.dismissEl.hidden = false;
      if (this.es) { this.es.close(); this.es = null; } // else the browser reconnects to a finished run
      this.setLive("finished");
      clearTimeout(this.kickTimer);
      this.loadDeliveries();
      this.loadThumbnails(null); // tiles of items that became ready get their thumbnail
      this.panel.refreshRuns(false);
    }
  };

  /** An item finished well: its thumbnail may exist now (fetched at most every 3 s). */
  BatchCard.prototype.thumbsLater = function () {
    var self = this;
    if (this.thumbTimer || this.closed) return;
    this.thumbTimer = setTimeout(function () { self.thumbTimer = null; self.loadThumbnails(null); }, 3000);
  };

  BatchCard.prototype.setLive = function (mode) {
    this.liveEl.textContent = mode;
    this.node.setAttribute("data-live", mode);
  };

  BatchCard.prototype.openStream = function () {
    var self = this;
    if (!window.EventSource) { this.startPolling(); return; }
    var es = new EventSource(this.panel.base + "runs/" + this.run.id + "/events");
    this.es = es;
    var parse = function (e) { try { return JSON.parse(e.data); } catch (err) { return null; } };
    es.addEventListener("open", function () { if (self.es === es) self.setLive("stream"); });
    es.addEventListener("snapshot", function (e) { var d = parse(e); if (d && self.es === es) self.applyRun(d); });
    es.addEventListener("items", function (e) {
      var d = parse(e);
      if (d && self.es === es) d.items.forEach(function (item) { self.applyItem(item); });
      self.applyRun(self.run); // the missing count
    });
    es.addEventListener("item", function (e) { var d = parse(e); if (d && self.es === es) self.applyItem(d.item); });
    es.addEventListener("status", function (e) {
      var d = parse(e);
      if (d && self.es === es && d.status) self.applyRun({ id: self.run.id, status: d.status });
    });
    es.addEventListener("progress", function (e) {
      var d = parse(e);
      if (d && self.es === es && d.counters) self.applyRun({ id: self.run.id, counters: Object.assign({}, self.run.counters, d.counters) });
    });
    es.onerror = function () {
      if (self.es !== es || self.closed) return;
      // The browser reconnects by itself (sending Last-Event-ID) unless the server refused.
      if (es.readyState === EventSource.CLOSED) { self.es = null; self.startPolling(); }
      else self.setLive("reconnecting");
    };
  };

  /** No stream: read the items and the run every 2 s until it is over. */
  BatchCard.prototype.startPolling = function () {
    var self = this;
    this.setLive("polling");
    var tick = function () {
      if (self.closed || isFinished(self.run)) return;
      Promise.all([
        self.loadThumbnails(null),
        api(self.panel.base, "runs/" + self.run.id).then(function (run) { self.applyRun(run); }),
      ]).then(null, function () {}).then(function () { self.pollTimer = setTimeout(tick, POLL_MS); });
    };
    tick();
  };

  /** Every item (pages of ITEM_PAGE) with its thumbnail, from GET runs/<id>/items. */
  BatchCard.prototype.loadThumbnails = function (after) {
    var self = this;
    var query = "?limit=" + ITEM_PAGE + (after !== null ? "&after=" + after : "");
    return api(this.panel.base, "runs/" + this.run.id + "/items" + query).then(function (page) {
      page.items.forEach(function (item) {
        if (item.thumbnail_url) self.thumbs[item.item_id] = item.thumbnail_url;
        // The stream is the fresher source; a page only fills in items it has not sent.
        if (!self.items[item.item_id] || !self.es) self.applyItem(item);
        else self.setThumb(item.item_id);
      });
      if (page.next !== null && page.next !== undefined && !self.closed) return self.loadThumbnails(page.next);
      return null;
    }, function (err) { self.panel.showError("Could not load batch #" + self.run.id + ": " + err.message, true); });
  };

  BatchCard.prototype.tile = function (item) {
    var self = this, id = item.item_id;
    var tile = this.tiles[id];
    if (tile) return tile;
    tile = el("button", { type: "button", class: "tp-tile", role: "listitem", "data-testid": "batch-item-" + id,
      "data-item-id": String(id) }, [
      el("span", { class: "tp-tile-id", text: "#" + id }),
      el("span", { class: "tp-tile-state" }),
    ]);
    tile.addEventListener("click", function () { self.select(id); });
    // Keep submission order: insert before the first tile with a larger position.
    var next = null, pos = item.position;
    if (pos !== null && pos !== undefined) {
      for (var i = 0; i < this.grid.children.length; i++) {
        var other = Number(this.grid.children[i].getAttribute("data-position"));
        if (other > pos) { next = this.grid.children[i]; break; }
      }
      tile.setAttribute("data-position", String(pos));
    }
    this.grid.insertBefore(tile, next);
    this.tiles[id] = tile;
    this.setThumb(id);
    return tile;
  };

  BatchCard.prototype.setThumb = function (id) {
    var tile = this.tiles[id], url = this.thumbs[id];
    if (!tile || !url || tile.querySelector("img")) return;
    tile.insertBefore(el("img", { src: url, alt: "", loading: "lazy" }), tile.firstChild);
  };

  function describeItem(item) {
    var text = "#" + item.item_id + ": " + item.state;
    if (item.attempts) text += " (" + item.attempts + " failed attempt" + (item.attempts > 1 ? "s" : "") + ")";
    if (item.state === "pending" && item.next_attempt_at) text += ", next attempt " + fmtTime(item.next_attempt_at);
    if (item.error) text += " — " + (item.error.stage ? item.error.stage + "/" : "") + item.error.code + ": " + item.error.message;
    if (item.state === "missing") text += " — no such image (or deleted) when the batch was created";
    if (item.seconds) text += " · " + item.seconds + " s";
    return text;
  }

  BatchCard.prototype.applyItem = function (item) {
    if (!item || item.item_id === undefined) return;
    this.items[item.item_id] = item;
    var tile = this.tile(item);
    this.setThumb(item.item_id);
    tile.setAttribute("data-state", item.state);
    tile.setAttribute("data-code", item.error ? item.error.code : "");
    tile.querySelector(".tp-tile-state").textContent = item.state;
    tile.title = describeItem(item); // the error on hover
    if (item.state === "succeeded" && !this.thumbs[item.item_id]) this.thumbsLater();
    if (this.selected === item.item_id) this.showDetail(item);
  };

  BatchCard.prototype.select = function (id) {
    var item = this.items[id];
    if (this.selected !== null && this.tiles[this.selected]) this.tiles[this.selected].classList.remove("tp-selected");
    if (this.selected === id) { this.selected = null; this.detailEl.hidden = true; return; }
    this.selected = id;
    this.tiles[id].classList.add("tp-selected");
    if (item) this.showDetail(item);
  };

  BatchCard.prototype.showDetail = function (item) {
    this.detailEl.hidden = false;
    this.detailEl.setAttribute("data-item-id", String(item.item_id));
    this.detailEl.textContent = describeItem(item);
  };

  /** Finish records and their callback deliveries, from GET runs/<id>. */
  BatchCard.prototype.loadDeliveries = function () {
    var self = this;
    clearTimeout(this.deliveryTimer);
    return api(this.panel.base, "runs/" + this.run.id).then(function (run) {
      self.applyRun(run);
      self.renderDeliveries(run);
      var pending = (run.finishes || []).some(function (f) { return f.delivery.state === "pending"; });
      if (pending && !self.closed) {
        self.deliveryTimer = setTimeout(function () { self.loadDeliveries(); }, DELIVERY_REFRESH_MS);
      }
    }, function () {});
  };

  BatchCard.prototype.renderDeliveries = function (run) {
    var box = this.deliveriesEl;
    box.textContent = "";
    var finishes = run.finishes || [];
    if (!run.callback_url && !finishes.length) return;
    box.appendChild(el("h4", { text: "Callback" + (run.callback_url ? ": " + run.callback_url : "") }));
    if (!finishes.length) {
      box.appendChild(el("p", { class: "tp-empty", text: "Called when the batch finishes." }));
      return;
    }
    var body = el("tbody");
    finishes.forEach(function (f) {
      var d = f.delivery;
      var last = d.last_status ? "HTTP " + d.last_status : (d.last_error || "—");
      body.appendChild(el("tr", { "data-testid": "delivery-" + run.id + "-" + f.seq, "data-state": d.state }, [
        el("td", { text: "#" + f.seq }),
        el("td", null, [el("span", { class: "tp-status tp-status-" + f.status, text: f.status })]),
        el("td", { text: fmtTime(f.at) }),
        el("td", null, [el("code", { class: "tp-code", text: d.id })]),
        el("td", { class: "tp-delivery-state", text: d.state }),
        el("td", { text: fmtInt(d.attempts) }),
        el("td", { class: "tp-msg", text: last }),
        el("td", { text: d.state === "delivered" ? fmtTime(d.delivered_at) : fmtTime(d.next_attempt_at) }),
      ]));
    });
    box.appendChild(el("table", { class: "tp-failed" }, [
      el("thead", null, [el("tr", null, ["Finish", "Status", "At", "webhook-id", "Delivery", "Attempts", "Last answer",
        "Delivered / next attempt"].map(function (h) { return el("th", { text: h }); }))]),
      body,
    ]));
  };

  // Kicks, when the page drives runs itself (no workers): one in flight per batch.
  BatchCard.prototype.scheduleKick = function (delay) {
    var self = this;
    clearTimeout(this.kickTimer);
    this.kickTimer = setTimeout(function () { self.kick(); }, delay);
  };

  BatchCard.prototype.kick = function () {
    var self = this, startedAt = Date.now();
    if (this.closed || !isActive(this.run) || this.run.status === "paused") {
      if (!this.closed && isActive(this.run)) this.scheduleKick(KICK_EVERY_MS);
      return;
    }
    api(this.panel.base, "runs/" + this.run.id + "/kick", "POST").then(
      function (run) { self.applyRun(run); },
      function () {}
    ).then(function () {
      if (!self.closed && isActive(self.run)) self.scheduleKick(Math.max(250, KICK_EVERY_MS - (Date.now() - startedAt)));
    });
  };

  // --- boot --------------------------------------------------------------------------

  var panels = [];
  document.querySelectorAll("section.task-panel[data-api-base]").forEach(function (section) {
    if (!section.getAttribute("data-api-base")) return;
    var panel = new Panel(section);
    panels.push(panel);
    panel.init();
  });
  window.picsiteTaskPanels = panels; // for debugging from the console
  window.addEventListener("pagehide", function () {
    panels.forEach(function (p) {
      p.stopFollowing();
      clearInterval(p.discoverTimer);
      Object.keys(p.batches).forEach(function (id) { p.batches[id].close(); });
    });
  });
})();

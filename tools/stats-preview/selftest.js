// Appended to the stats page by `serve.py --inject` (see selftest.sh). Drives the page like
// a user: token prompt on 401, drain/disable/enable, pause/resume, then writes the outcome
// into <pre id="selftest"> for `chromium --dump-dom` to read.
(function () {
  "use strict";
  const TOKEN = "s3cret";
  const UP2 = "web <b>backends</b>/€";  // the upstream's name under serve.py --evil
  const log = [];
  const errors = [];
  let failed = false;
  const posts = [];
  let statusGets = 0;
  window.addEventListener("error", (e) => errors.push("error: " + e.message));
  window.addEventListener("unhandledrejection", (e) => errors.push("unhandled rejection: " + e.reason));
  const origError = console.error;
  console.error = function () { errors.push("console.error: " + Array.from(arguments).join(" ")); return origError.apply(console, arguments); };
  const origFetch = window.fetch;
  window.fetch = function (url, opts) {
    if (opts && opts.method === "POST") posts.push({ url: String(url), auth: (opts.headers || {}).Authorization || null });
    else if (String(url) === "api/status") statusGets++;
    return origFetch.apply(this, arguments);
  };

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  async function until(fn, what, ms) {
    const end = Date.now() + (ms || 10000);
    for (;;) {
      let v = null;
      try { v = fn(); } catch (e) { v = null; }
      if (v) return v;
      if (Date.now() > end) throw new Error("timed out waiting for " + what);
      await sleep(50);
    }
  }
  function check(cond, msg) { log.push((cond ? "ok   " : "FAIL ") + msg); if (!cond) failed = true; }
  function row(addr) {
    for (const tr of document.querySelectorAll("tr.srv")) {
      const m = tr.querySelector(".mono");
      if (m && m.textContent === addr) return tr;
    }
    return null;
  }
  function button(addr, label) {
    const tr = row(addr);
    return tr && Array.from(tr.querySelectorAll("button")).find((b) => b.textContent === label);
  }
  const state = (addr) => { const tr = row(addr); return tr ? tr.querySelector(".badge").textContent : null; };
  const dialog = () => document.getElementById("token-dialog");
  const toasts = () => Array.from(document.querySelectorAll(".toast")).map((t) => t.textContent);
  async function click(addr, label) {
    const b = await until(() => { const x = button(addr, label); return x && !x.disabled ? x : null; }, label + " on " + addr + " enabled");
    b.click();
  }
  async function giveToken(value) {
    await until(() => dialog().open, "the token dialog to open");
    document.getElementById("token-input").value = value;
    document.getElementById("token-form").requestSubmit();
    check(!dialog().open, "the token dialog closes on submit");
  }

  async function run() {
    await until(() => row("10.0.0.11:5432"), "the server rows");
    check(document.querySelectorAll("tr.srv").length === 5, "5 server rows rendered");
    check(window.__xss === undefined, "no HTML from the API was executed");
    check(document.body.textContent.includes("<script>window.__xss=2<\/script>:8443"), "HTML in a configured name shows as text");
    check(document.body.textContent.includes(UP2), "HTML in an upstream name shows as text");
    check(state("10.0.1.22:8443") === "down" && state("10.0.1.23:8443") === "disabled" && state("10.0.0.12:5432") === "draining", "states as served");
    const failCell = row("10.0.1.22:8443").querySelector(".fail");
    check(failCell && /refused/.test(failCell.title), "failed check's reason in the title: " + (failCell && failCell.title));
    check(/no checks/.test(row("10.0.1.23:8443").textContent), "null last_check shows 'no checks'");

    await until(() => !/–/.test(document.querySelector("#listeners tbody tr td:nth-child(7)").textContent), "a connection rate");
    check(/\/s$/.test(document.querySelector("#listeners tbody tr td:nth-child(7)").textContent), "listener rate shown");
    check(document.querySelectorAll("#chart-conn path").length >= 1, "active-connections chart drawn");

    // 401 -> token dialog; wrong token -> asked again with the server's message; right one -> done.
    await click("10.0.0.11:5432", "Drain");
    await giveToken("wrong");
    await until(() => posts.length >= 2 && dialog().open, "the dialog to ask again");
    const msg = document.getElementById("token-err");
    check(!msg.hidden && /Bearer/.test(msg.textContent), "the refused token's error is shown: " + msg.textContent);
    await giveToken(TOKEN);
    await until(() => state("10.0.0.11:5432") === "draining", "10.0.0.11:5432 draining");
    check(true, "drain applied after the token was given");
    check(toasts().some((t) => /draining/.test(t)), "a confirmation toast: " + toasts().join(" | "));
    const p0 = posts[0], pl = posts[posts.length - 1];
    check(p0.url === "api/upstreams/pg-pool/servers/10.0.0.11%3A5432/drain", "POST URL " + p0.url);
    check(p0.auth === null, "first POST without a token");
    check(pl.auth === "Bearer " + TOKEN, "last POST with the bearer token");
    check(sessionStorage.getItem("ferry.adminToken") === TOKEN, "token kept in sessionStorage");
    check(!document.getElementById("forget-token").hidden, "'Forget token' shown");

    // The token is reused; IPv6 address and a name with '/', spaces, HTML are URL-encoded.
    const n = posts.length;
    await click("[fd00::21]:8443", "Disable");
    await until(() => state("[fd00::21]:8443") === "disabled", "[fd00::21]:8443 disabled");
    check(!dialog().open && posts.length === n + 1, "no second prompt once the token is known");
    check(posts[n].url === "api/upstreams/" + encodeURIComponent(UP2) + "/servers/%5Bfd00%3A%3A21%5D%3A8443/disable", "POST URL " + posts[n].url);
    await click("[fd00::21]:8443", "Enable");
    await until(() => state("[fd00::21]:8443") === "up", "[fd00::21]:8443 up again");
    await click("10.0.0.11:5432", "Enable");
    await until(() => state("10.0.0.11:5432") === "up", "10.0.0.11:5432 up again");
    check(true, "enable brings servers back");
    check(button("10.0.0.11:5432", "Enable").disabled && !button("10.0.0.11:5432", "Drain").disabled, "buttons follow the state");

    // Forget the token, then cancel the prompt: nothing changes, an error toast says so.
    document.getElementById("forget-token").click();
    check(sessionStorage.getItem("ferry.adminToken") === null, "token forgotten");
    await click("10.0.0.11:5432", "Disable");
    await until(() => dialog().open, "the dialog after forgetting");
    document.getElementById("token-cancel").click();
    await until(() => toasts().some((t) => /Cancelled/.test(t)), "a cancel toast");
    await sleep(2500);
    check(state("10.0.0.11:5432") === "up", "cancel leaves the server alone");

    // Pause stops polling; resume starts it again.
    document.getElementById("pause").click();
    check(document.getElementById("state-word").textContent === "Paused", "pill says Paused");
    const g = statusGets;
    await sleep(7000);
    check(statusGets === g, "no polls while paused (" + (statusGets - g) + ")");
    document.getElementById("pause").click();
    await until(() => statusGets > g, "a poll after resume");
    await until(() => document.getElementById("state-word").textContent === "Live", "Live again");
    check(true, "resume polls again");
  }

  run().catch((e) => { failed = true; log.push("FAIL " + e.message); }).finally(() => {
    for (const e of errors) log.push("FAIL " + e);
    const pre = document.createElement("pre");
    pre.id = "selftest";
    pre.textContent = (failed || errors.length ? "SELFTEST FAIL" : "SELFTEST PASS") + "\n" + log.join("\n") + "\nEND SELFTEST\n";
    document.body.append(pre);
  });
})();

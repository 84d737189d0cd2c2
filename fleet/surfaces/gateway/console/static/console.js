// The run console's few scripts: live rows, a run's events, the operators' actions.
// Values from the server go into the page as text (textContent), never as markup.
(function () {
  "use strict";
  var csrfMeta = document.querySelector('meta[name="fleet-csrf"]');
  var csrf = csrfMeta ? csrfMeta.content : "";

  function call(method, url) {
    // The key travels in the HttpOnly cookie; the page's token says this page sent it.
    return fetch(url, {
      method: method, credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
      body: method === "POST" ? "{}" : undefined
    }).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (data) {
        if (!r.ok) { throw new Error(data.error || r.statusText); }
        return data;
      });
    });
  }

  function runLink(runId) {
    var a = document.createElement("a");
    a.href = "/console/runs/" + encodeURIComponent(runId);
    a.textContent = "run " + runId.slice(0, 8);
    return a;
  }

  document.addEventListener("click", function (ev) {
    var button = ev.target.closest("button[data-action]");
    if (!button) { return; }
    var out = button.parentElement.querySelector(".outcome");
    button.disabled = true;
    call(button.dataset.method, button.dataset.url).then(function (data) {
      out.textContent = "";
      if (button.dataset.action === "replay") {
        out.append("replaying ", runLink(data.run_id));
        out.dataset.run = data.run_id;
      } else {
        out.textContent = data.cancelled ? "cancelled" : "already " + data.status;
        setTimeout(function () { location.reload(); }, 400);
      }
    }).catch(function (err) {
      out.textContent = "refused: " + err.message;
      button.disabled = false;
    });
  });

  // The list: its rows again every two seconds, with the same filters.
  var rows = document.getElementById("runs-rows");
  if (rows && rows.dataset.src) {
    setInterval(function () {
      fetch(rows.dataset.src, {credentials: "same-origin"}).then(function (r) {
        return r.ok ? r.text() : null;
      }).then(function (html) {
        if (html !== null) { rows.innerHTML = html; }  // rendered and escaped by the server
      }).catch(function () {});
    }, 2000);
  }

  // A run: its events as they happen; the page is drawn again once the run ends.
  var events = document.getElementById("events");
  if (events && events.dataset.src && window.EventSource) {
    var tokens = document.getElementById("tokens");
    var source = new EventSource(events.dataset.src);
    var add = function (text) {
      var li = document.createElement("li");
      li.textContent = text;
      events.appendChild(li);
    };
    source.addEventListener("status", function (e) {
      var d = JSON.parse(e.data);
      add("status " + d.status);
      var shown = document.querySelector("#run-status .status");
      if (shown) { shown.textContent = d.status; shown.className = "status s-" + d.status; }
    });
    source.addEventListener("step", function (e) {
      var d = JSON.parse(e.data);
      add("step " + d.step + " " + d.status + (d.duration_s ? " in " + Number(d.duration_s).toFixed(3) + "s" : ""));
    });
    source.addEventListener("token", function (e) {
      tokens.textContent += JSON.parse(e.data).text || "";
    });
    source.onerror = function () {
      // The stream ends with the run (or the server went away): draw the page again.
      source.close();
      setTimeout(function () { location.reload(); }, 500);
    };
  }
})();

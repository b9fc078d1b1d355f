// The Sandrun web page: write or drop code, run it, watch its output live.
// It talks to the same HTTP API as every other client (see /docs): POST /submit,
// the WebSocket at /logs/{id}/stream?format=json, GET /status/{id} and /outputs/{id}.
// No external asset: CodeMirror is served from /ui/vendor/.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  // Used when the server has no /runtimes: the interpreters a manifest may name.
  const FALLBACK = [
    {language: "python", interpreter: "python3", extensions: [".py"]},
    {language: "javascript", interpreter: "node", extensions: [".js", ".mjs"]},
    {language: "bash", interpreter: "bash", extensions: [".sh"]},
    {language: "ruby", interpreter: "ruby", extensions: [".rb"]},
    {language: "r", interpreter: "Rscript", extensions: [".R", ".r"]},
    {language: "perl", interpreter: "perl", extensions: [".pl"]},
    {language: "php", interpreter: "php", extensions: [".php"]},
  ];
  const MODES = {python3: "python", node: "javascript", bash: "shell", sh: "shell",
                 ruby: "ruby", Rscript: "r", perl: "perl", php: "php"};
  const EXTENSIONS = {python3: ".py", node: ".js", bash: ".sh", sh: ".sh", ruby: ".rb",
                      Rscript: ".R", perl: ".pl", php: ".php"};
  const ARCHIVE = /\.(tar\.gz|tgz|tar)$/i;

  let runtimes = FALLBACK;
  let files = [];  // [{path, file}] dropped or chosen
  let running = false;
  let socket = null;

  const editor = CodeMirror.fromTextArea($("code"), {
    lineNumbers: true, mode: "python", matchBrackets: true, indentUnit: 4,
    autofocus: true, inputStyle: "contenteditable",
  });
  window.sandrunEditor = editor;  // for tests and the console

  // -- languages -----------------------------------------------------------------------------

  function fillLanguages(list) {
    runtimes = list.length ? list : FALLBACK;
    const select = $("language");
    select.textContent = "";
    for (const r of runtimes) {
      const option = document.createElement("option");
      option.value = r.interpreter;
      option.textContent = r.language + (r.version ? " " + r.version : "") +
        (r.language !== r.interpreter ? " (" + r.interpreter + ")" : "");
      select.appendChild(option);
    }
    select.value = runtimes.some((r) => r.interpreter === "python3") ? "python3"
      : runtimes[0].interpreter;
    languageChanged();
  }

  function languageChanged() {
    const interpreter = $("language").value;
    editor.setOption("mode", MODES[interpreter] || null);
    const name = $("filename");
    if (/^main\.[A-Za-z]+$/.test(name.value) || !name.value) {
      const runtime = runtimes.find((r) => r.interpreter === interpreter) || {};
      const ext = (runtime.extensions && runtime.extensions[0]) || EXTENSIONS[interpreter] || "";
      name.value = "main" + ext;
    }
  }

  $("language").addEventListener("change", languageChanged);

  fetch("/runtimes", {headers: {Accept: "application/json"}})
    .then((r) => (r.ok ? r.json() : {runtimes: []}))
    .then((doc) => fillLanguages(Array.isArray(doc.runtimes) ? doc.runtimes : []))
    .catch(() => fillLanguages([]));

  fetch("/", {headers: {Accept: "application/json"}})
    .then((r) => r.json())
    .then((info) => { $("service").textContent = info.service + " " + info.version; })
    .catch(() => {});

  // -- files ---------------------------------------------------------------------------------

  function addFile(path, file) {
    // Read now: what was chosen is what runs, even if the file changes on disk later.
    const bytes = file.arrayBuffer();
    bytes.catch(() => {});
    files = files.filter((f) => f.path !== path);
    files.push({path, file, bytes});
    showFiles();
  }

  function showFiles() {
    const list = $("filelist");
    list.textContent = "";
    for (const f of files) {
      const item = document.createElement("li");
      item.textContent = f.path + " (" + f.file.size + " bytes)";
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "x";
      remove.title = "remove";
      remove.addEventListener("click", () => {
        files = files.filter((g) => g !== f);
        showFiles();
      });
      item.appendChild(remove);
      list.appendChild(item);
    }
  }

  $("files").addEventListener("change", (e) => {
    for (const file of e.target.files) addFile(file.name, file);
    e.target.value = "";
  });
  $("folder").addEventListener("change", (e) => {
    for (const file of e.target.files) addFile(file.webkitRelativePath || file.name, file);
    e.target.value = "";
  });

  function walk(entry, prefix) {
    return new Promise((resolve) => {
      if (entry.isFile) {
        entry.file((file) => { addFile(prefix + file.name, file); resolve(); }, () => resolve());
      } else if (entry.isDirectory) {
        const reader = entry.createReader();
        const all = [];
        const more = () => reader.readEntries((batch) => {
          if (!batch.length) {
            Promise.all(all.map((e) => walk(e, prefix + entry.name + "/"))).then(resolve);
          } else {
            all.push(...batch);
            more();
          }
        }, () => resolve());
        more();
      } else {
        resolve();
      }
    });
  }

  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const items = e.dataTransfer.items;
    if (items && items.length && items[0].webkitGetAsEntry) {
      for (const item of items) {
        const entry = item.webkitGetAsEntry();
        if (entry) walk(entry, "");
      }
    } else {
      for (const file of e.dataTransfer.files) addFile(file.name, file);
    }
  });

  // -- the request ---------------------------------------------------------------------------

  function lines(id) {
    const text = $(id).value.replace(/\r/g, "");
    return text ? text.replace(/\n$/, "").split("\n") : [];
  }

  function manifest() {
    const m = {};
    const code = editor.getValue();
    const name = $("filename").value.trim();
    const entry = $("entrypoint").value.trim() || (code ? name : "");
    if (entry) m.entrypoint = entry;
    if (entry === name && code) m.interpreter = $("language").value;
    const args = lines("args");
    if (args.length) m.args = args;
    const env = {};
    for (const line of lines("env")) {
      if (!line.trim()) continue;
      const i = line.indexOf("=");
      env[i < 0 ? line : line.slice(0, i)] = i < 0 ? "" : line.slice(i + 1);
    }
    if (Object.keys(env).length) m.env = env;
    if ($("stdin").value) m.stdin = $("stdin").value;
    const outputs = lines("outputs").filter((l) => l.trim());
    if (outputs.length) m.outputs = outputs;
    if ($("timeout").value) m.timeout = Number($("timeout").value);
    if ($("memory").value) m.memory_mb = Number($("memory").value);
    return m;
  }

  function base64(buffer) {
    const bytes = new Uint8Array(buffer);
    let text = "";
    for (let i = 0; i < bytes.length; i += 0x8000) {
      text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    }
    return btoa(text);
  }

  async function body() {
    const m = manifest();
    const code = editor.getValue();
    const name = $("filename").value.trim() || "main";
    if (files.some((f) => ARCHIVE.test(f.path))) {
      // An archive is unpacked by the server: only the multipart form does that.
      const form = new FormData();
      if (code) form.append("files", new Blob([code]), name);
      for (const f of files) {
        form.append("files", new Blob([await f.bytes]), f.path.split("/").pop());
      }
      form.append("manifest", JSON.stringify(m));
      return {body: form, headers: {}};
    }
    // The JSON form keeps a folder's paths.
    const all = {};
    if (code) all[name] = code;
    for (const f of files) all[f.path] = {base64: base64(await f.bytes)};
    return {body: JSON.stringify({manifest: m, files: all}),
            headers: {"Content-Type": "application/json"}};
  }

  // -- showing the result --------------------------------------------------------------------

  function showError(status, doc) {
    const box = $("error");
    let text = status + " " + (doc.error || "Error");
    const why = doc.reason && status === 429 ? doc.reason : doc.details;
    if (why) text += ": " + why;
    if (doc.retry_after) text += " (retry in " + doc.retry_after + " s)";
    box.textContent = text;
    box.hidden = false;
  }

  function set(id, value) { $(id).textContent = value === null || value === undefined ? "-" : value; }

  function showEnd(done) {
    set("status", done.status);
    set("reason", done.reason);
    set("exit", done.exit_code);
    set("cpu", typeof done.cpu_seconds === "number" ? done.cpu_seconds.toFixed(3) + " s" : null);
    set("memory-peak", typeof done.memory_peak_bytes === "number"
      ? (done.memory_peak_bytes / 1048576).toFixed(1) + " MiB" : null);
    set("wall", typeof done.wall_time_ms === "number"
      ? (done.wall_time_ms / 1000).toFixed(3) + " s" : null);
    $("status").className = done.status === "completed" ? "ok" : "bad";
  }

  function showSignature(doc) {
    const el = $("signature");
    const meta = doc.worker_metadata || {};
    if (doc.signature_verified === true) {
      el.textContent = "signature verified";
      el.className = "ok";
    } else if (doc.signature_verified === false) {
      el.textContent = "signature NOT verified";
      el.className = "bad";
    } else if (meta.signature) {
      el.textContent = "signed by worker " + String(meta.worker_id).slice(0, 12) + "...";
      el.className = "";
    } else {
      el.textContent = "unsigned";
      el.className = "muted";
    }
  }

  function append(stream, data) {
    const out = $("output");
    const atEnd = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
    const span = document.createElement("span");
    span.className = stream;
    span.textContent = data;
    out.appendChild(span);
    if (atEnd) out.scrollTop = out.scrollHeight;
  }

  async function finish(jobId) {
    try {
      const status = await (await fetch("/status/" + encodeURIComponent(jobId))).json();
      const meta = status.execution_metadata || {};
      showEnd({status: status.status, reason: meta.reason, exit_code: meta.exit_code,
               cpu_seconds: meta.cpu_seconds, memory_peak_bytes: meta.memory_peak_bytes,
               wall_time_ms: meta.wall_time_ms});
      showSignature(status);
      const listing = await (await fetch("/outputs/" + encodeURIComponent(jobId))).json();
      const list = $("downloads");
      list.textContent = "";
      for (const f of listing.files || []) {
        const item = document.createElement("li");
        const link = document.createElement("a");
        link.href = f.download_url;
        link.textContent = f.path;
        link.setAttribute("download", f.path.split("/").pop());
        item.appendChild(link);
        item.appendChild(document.createTextNode(" (" + f.size_bytes + " bytes)"));
        list.appendChild(item);
      }
    } finally {
      running = false;
      $("run").disabled = false;
      document.body.dataset.state = "done";
    }
  }

  function watch(jobId) {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(scheme + location.host + "/logs/" + encodeURIComponent(jobId) +
                           "/stream?format=json");
    let ended = false;
    socket.onmessage = (event) => {
      const frame = JSON.parse(event.data);
      if (frame.type === "output") append(frame.stream, frame.data);
      else if (frame.type === "status") set("status", frame.status);
      else if (frame.type === "done") { ended = true; showEnd(frame); }
    };
    socket.onclose = () => {
      socket = null;
      if (!ended) append("stderr", "\n[the live output closed before the job ended]\n");
      finish(jobId);
    };
  }

  async function run() {
    if (running) return;
    running = true;
    $("run").disabled = true;
    document.body.dataset.state = "running";
    $("error").hidden = true;
    $("summary").hidden = true;
    $("output").textContent = "";
    $("downloads").textContent = "";
    let jobId = null;
    try {
      const request = await body();
      const response = await fetch("/submit", {method: "POST", body: request.body,
                                               headers: request.headers});
      let doc;
      try { doc = await response.json(); } catch (e) { doc = {error: response.statusText}; }
      if (!response.ok) {
        showError(response.status, doc);
        return;
      }
      jobId = doc.job_id;
      set("job", "job " + jobId);
      set("status", doc.status);
      for (const id of ["reason", "exit", "cpu", "memory-peak", "wall", "signature"]) set(id, "");
      $("summary").hidden = false;
      watch(jobId);
    } catch (e) {
      showError(0, {error: "Could not reach the server", details: String(e)});
    } finally {
      if (jobId === null) {
        running = false;
        $("run").disabled = false;
        document.body.dataset.state = "done";
      }
    }
  }

  $("run").addEventListener("click", run);
  document.addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === "Enter") {
      e.preventDefault();
      run();
    }
  });
})();

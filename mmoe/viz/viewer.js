/* mmoe routing viewer: draws the routing JSON that mmoe/viz/html.py embeds in index.html.
 *
 * Per input image and MoE layer, the patch grid over the image (coloured by the majority expert, one head's
 * first-choice expert, or the number of distinct experts a patch's sub-tokens reach, [MH1] Fig. 1b / Fig. 8);
 * hovering or clicking a patch lists its h sub-tokens' top-k experts and gates in every model shown; the
 * per-word text routing; the experts x layers load heat map ([MH1] Fig. 5). Plain DOM, no libraries, no network.
 * index.html#layer=layer3&pin=2,5 opens on a layer with a patch pinned. With "selftest" in the URL (index.html?selftest) the page checks itself and writes the results as JSON into
 * <pre id="selftest-result"> (what the headless-browser test reads).
 */
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("routing-data").textContent);
  var state = { input: 0, key: null, view: "majority", hover: null, pinned: null, tokenPinned: null };

  function el(tag, attrs, kids) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") node.textContent = attrs[k];
      else if (k === "cls") node.className = attrs[k];
      else node.setAttribute(k, attrs[k]);
    });
    (kids || []).forEach(function (kid) { if (kid) node.appendChild(kid); });
    return node;
  }

  function rgba(hex, alpha) {
    var n = parseInt(hex.slice(1), 16);
    return "rgba(" + ((n >> 16) & 255) + ", " + ((n >> 8) & 255) + ", " + (n & 255) + ", " + alpha + ")";
  }

  /* the palette of the layer's E experts, as in the PNGs (mmoe.viz.experts.expert_colors depends on E) */
  function expertColor(e, numE) { return e < 0 ? DATA.pad_color : DATA.colors[String(numE)][e]; }

  function heatColor(v, vmax) {
    if (v === null || v === undefined) return "#ffffff";
    var i = Math.max(0, Math.min(DATA.heat.length - 1, Math.round((v / (vmax || 1)) * (DATA.heat.length - 1))));
    return DATA.heat[i];
  }

  function chip(e, numE) {
    var c = el("span", { cls: e < 0 ? "chip pad" : "chip", text: e < 0 ? "pad" : "e" + e, "data-expert": String(e) });
    if (e >= 0) c.style.background = expertColor(e, numE);
    return c;
  }

  function allKeys() {
    var keys = [];
    DATA.models.forEach(function (m) { m.keys.forEach(function (k) { if (keys.indexOf(k) < 0) keys.push(k); }); });
    return keys;
  }

  function layerOf(m, key) { return m.layers[key] || null; }

  function patchEntry(m, key) {
    var layer = layerOf(m, key);
    if (!layer) return null;
    for (var i = 0; i < layer.images.length; i++) if (layer.images[i].input === state.input) return layer.images[i];
    return null;
  }

  function textEntry(m, key) {
    var layer = layerOf(m, key);
    if (!layer) return null;
    for (var i = 0; i < layer.text.length; i++) if (layer.text[i].input === state.input) return layer.text[i];
    return null;
  }

  function maxHeads() {
    var h = 1;
    DATA.models.forEach(function (m) { m.keys.forEach(function (k) { h = Math.max(h, m.layers[k].num_heads); }); });
    return h;
  }

  /* ------------------------------------------------------------------ controls */

  function buildControls() {
    var img = document.getElementById("image-select");
    DATA.inputs.forEach(function (x) {
      var label = x.index + ": " + x.name + (x.text ? " | " + x.text : "");
      img.appendChild(el("option", { value: String(x.index), text: label.length > 90 ? label.slice(0, 87) + "..." : label }));
    });
    var layer = document.getElementById("layer-select");
    allKeys().forEach(function (k) { layer.appendChild(el("option", { value: k, text: k })); });
    var view = document.getElementById("view-select");
    view.appendChild(el("option", { value: "majority", text: "majority expert" }));
    for (var j = 0; j < maxHeads(); j++) view.appendChild(el("option", { value: "head" + j, text: "head " + j + " first choice" }));
    view.appendChild(el("option", { value: "diversity", text: "distinct experts per patch" }));
    state.key = layer.value;
    img.addEventListener("change", function () { state.input = +img.value; state.pinned = null; state.tokenPinned = null; render(); });
    layer.addEventListener("change", function () { state.key = layer.value; render(); });
    view.addEventListener("change", function () { state.view = view.value; render(); });
  }

  /* ------------------------------------------------------------------ patch panels */

  function buildPanels() {
    var box = document.getElementById("models");
    DATA.models.forEach(function (m, mi) {
      var panel = el("div", { cls: "model-panel", "data-model": String(mi) }, [
        el("h3", { text: m.label }),
        el("div", { cls: "layer-stats" }),
        el("div", { cls: "patch-view" }),
        el("div", { cls: "legend" }),
        el("div", { cls: "patch-detail" }),
      ]);
      box.appendChild(panel);
    });
    box.addEventListener("mouseover", function (ev) {
      var p = ev.target.closest(".patch");
      if (!p) return;
      state.hover = [+p.dataset.r, +p.dataset.c];
      renderFocus();
    });
    box.addEventListener("mouseout", function (ev) {
      if (ev.target.closest(".patch")) { state.hover = null; renderFocus(); }
    });
    box.addEventListener("click", function (ev) {
      var p = ev.target.closest(".patch");
      if (!p) return;
      var rc = [+p.dataset.r, +p.dataset.c];
      state.pinned = state.pinned && state.pinned[0] === rc[0] && state.pinned[1] === rc[1] ? null : rc;
      renderFocus();
    });
  }

  function cellColor(entry, r, c, layer) {
    var numE = layer.num_experts;
    if (state.view === "majority") return rgba(expertColor(entry.majority[r][c], numE), DATA.alpha);
    if (state.view === "diversity") {
      var table = DATA.diversity_colors[String(layer.num_heads)];
      return rgba(table[Math.max(0, Math.min(table.length - 1, entry.diversity[r][c] - 1))], DATA.alpha);
    }
    var j = +state.view.slice(4);
    if (j >= layer.num_heads) return "rgba(0, 0, 0, 0)";
    return rgba(expertColor(entry.first_choice[r][c][j], numE), DATA.alpha);
  }

  function renderPanels() {
    DATA.models.forEach(function (m, mi) {
      var panel = document.querySelector('.model-panel[data-model="' + mi + '"]');
      var view = panel.querySelector(".patch-view"), stats = panel.querySelector(".layer-stats");
      var legend = panel.querySelector(".legend");
      view.innerHTML = "";
      legend.innerHTML = "";
      var layer = layerOf(m, state.key), entry = patchEntry(m, state.key), uri = m.images[state.input];
      if (!layer) {
        stats.textContent = "";
        view.appendChild(el("div", { cls: "missing", text: m.label + " has no routing key " + state.key }));
        return;
      }
      stats.textContent = state.key + ": E=" + layer.num_experts + ", h=" + layer.num_heads + ", top-" + layer.top_k +
        "; activation ratio " + (100 * layer.activation_ratio).toFixed(1) + "% (" + layer.activated_experts.length + "/" +
        layer.num_experts + " experts, all inputs)" +
        (layer.mean_patch_diversity === null ? "" : "; mean distinct experts per patch " + layer.mean_patch_diversity.toFixed(2));
      for (var e = 0; e < layer.num_experts; e++) legend.appendChild(chip(e, layer.num_experts));
      if (uri === null || uri === undefined || !entry) {
        view.appendChild(el("div", { cls: "missing", text: "input " + state.input + " has no image (text only)" }));
        return;
      }
      var img = el("img", { src: DATA.images[uri], alt: DATA.inputs[state.input].name });
      if (m.image_size < 200) img.className = "pixelated";
      view.appendChild(img);
      var gh = m.grid[0], gw = m.grid[1];
      var grid = el("div", { cls: "patch-grid" });
      grid.style.gridTemplateColumns = "repeat(" + gw + ", 1fr)";
      grid.style.gridTemplateRows = "repeat(" + gh + ", 1fr)";
      for (var r = 0; r < gh; r++) {
        for (var c = 0; c < gw; c++) {
          var cell = el("div", { cls: "patch", "data-r": String(r), "data-c": String(c) });
          cell.style.background = cellColor(entry, r, c, layer);
          cell.title = "patch (" + r + ", " + c + "): majority e" + entry.majority[r][c] + ", " + entry.diversity[r][c] + " distinct";
          grid.appendChild(cell);
        }
      }
      view.appendChild(grid);
    });
    renderFocus();
  }

  function renderFocus() {
    var rc = state.pinned || state.hover;
    DATA.models.forEach(function (m, mi) {
      var panel = document.querySelector('.model-panel[data-model="' + mi + '"]');
      panel.querySelectorAll(".patch").forEach(function (p) {
        var here = rc && +p.dataset.r === rc[0] && +p.dataset.c === rc[1];
        p.classList.toggle("focus", !!here);
        p.classList.toggle("pinned", !!(here && state.pinned));
      });
      var detail = panel.querySelector(".patch-detail");
      detail.innerHTML = "";
      var layer = layerOf(m, state.key), entry = patchEntry(m, state.key);
      if (!rc || !layer || !entry) {
        detail.appendChild(el("div", { cls: "hint", text: "hover over a patch for its sub-tokens' experts and gates; click to pin it" }));
        return;
      }
      var r = Math.min(rc[0], m.grid[0] - 1), c = Math.min(rc[1], m.grid[1] - 1);
      detail.setAttribute("data-r", String(r));
      detail.setAttribute("data-c", String(c));
      detail.appendChild(el("div", { text: (state.pinned ? "pinned " : "") + "patch (row " + r + ", col " + c + ") of " +
        m.grid[0] + "x" + m.grid[1] + ", " + state.key + ": majority e" + entry.majority[r][c] + ", " +
        entry.diversity[r][c] + " distinct of h=" + layer.num_heads }));
      var table = el("table", { cls: "routes" });
      table.appendChild(el("tr", {}, [el("th", { text: "sub-token" }), el("th", { text: "experts (top-" + layer.top_k + ") : gates" })]));
      entry.experts[r][c].forEach(function (ids, j) {
        var cell = el("td");
        ids.forEach(function (e, k) {
          cell.appendChild(chip(e, layer.num_experts));
          cell.appendChild(el("span", { cls: "gate", text: e < 0 ? "" : entry.gates[r][c][j][k].toFixed(3), "data-gate": String(entry.gates[r][c][j][k]) }));
        });
        table.appendChild(el("tr", { "data-head": String(j) }, [el("td", { text: "head " + j }), cell]));
      });
      detail.appendChild(table);
    });
  }

  /* ------------------------------------------------------------------ text */

  function tokenTitle(row) {
    return row.token + " (word '" + row.word + "'): " + row.experts.map(function (ids, j) {
      return "head " + j + " " + ids.map(function (e, k) { return e < 0 ? "pad" : "e" + e + ":" + row.gates[j][k].toFixed(2); }).join(" ");
    }).join("; ");
  }

  function renderText() {
    var box = document.getElementById("text-routing");
    box.innerHTML = "";
    var any = false;
    DATA.models.forEach(function (m, mi) {
      var entry = textEntry(m, state.key), layer = layerOf(m, state.key);
      var part = el("div", { cls: "text-model", "data-model": String(mi) }, [el("h3", { text: m.label + ", " + state.key })]);
      box.appendChild(part);
      if (!entry || !layer) {
        part.appendChild(el("div", { cls: "hint", text: DATA.inputs[state.input].text ? "no text routing in this layer" : "this input has no text" }));
        return;
      }
      any = true;
      part.appendChild(el("div", { cls: "hint", text: "each token: its h sub-tokens' first-choice experts (top to bottom), tokens grouped by word; hover or click for top-k gates" }));
      var sentence = el("div", { cls: "sentence" }), word = null, wordIndex = -1;
      entry.tokens.forEach(function (row, t) {
        if (row.word_index !== wordIndex) {
          word = el("div", { cls: "word", "data-word": row.word });
          sentence.appendChild(word);
          wordIndex = row.word_index;
        }
        var tok = el("div", { cls: "token", "data-position": String(t), title: tokenTitle(row) });
        row.experts.forEach(function (ids) {
          var sub = el("div", { cls: "sub", text: ids[0] < 0 ? "" : String(ids[0]), "data-expert": String(ids[0]) });
          sub.style.background = expertColor(ids[0], layer.num_experts);
          tok.appendChild(sub);
        });
        tok.appendChild(el("div", { cls: "piece", text: row.token }));
        word.appendChild(tok);
      });
      part.appendChild(sentence);
      var detail = el("div", { cls: "token-detail" });
      part.appendChild(detail);
      var show = function (t) {
        detail.innerHTML = "";
        if (t === null) return;
        var row = entry.tokens[t];
        detail.appendChild(el("div", { text: "token " + t + " '" + row.token + "' of word '" + row.word + "': majority e" + row.majority + ", " + row.distinct + " distinct" }));
        var table = el("table", { cls: "routes" });
        row.experts.forEach(function (ids, j) {
          var cell = el("td");
          ids.forEach(function (e, k) { cell.appendChild(chip(e, layer.num_experts)); cell.appendChild(el("span", { cls: "gate", text: e < 0 ? "" : row.gates[j][k].toFixed(3) })); });
          table.appendChild(el("tr", { "data-head": String(j) }, [el("td", { text: "head " + j }), cell]));
        });
        detail.appendChild(table);
      };
      sentence.addEventListener("mouseover", function (ev) { var t = ev.target.closest(".token"); if (t) show(+t.dataset.position); });
      sentence.addEventListener("mouseout", function () { show(state.tokenPinned); });
      sentence.addEventListener("click", function (ev) {
        var t = ev.target.closest(".token");
        if (!t) return;
        var pos = +t.dataset.position;
        state.tokenPinned = state.tokenPinned === pos ? null : pos;
        sentence.querySelectorAll(".token").forEach(function (x) { x.classList.toggle("pinned", +x.dataset.position === state.tokenPinned); });
        show(state.tokenPinned);
      });
      if (state.tokenPinned !== null && state.tokenPinned < entry.tokens.length) show(state.tokenPinned);
    });
    document.getElementById("text-section").style.display = any || DATA.inputs.some(function (x) { return x.text; }) ? "" : "none";
  }

  /* ------------------------------------------------------------------ load heat map */

  function renderHeat() {
    var box = document.getElementById("load-heatmap");
    box.innerHTML = "";
    var vmax = 0;
    DATA.models.forEach(function (m) { m.keys.forEach(function (k) { m.layers[k].load.forEach(function (v) { vmax = Math.max(vmax, v); }); }); });
    DATA.models.forEach(function (m, mi) {
      var numE = 0;
      m.keys.forEach(function (k) { numE = Math.max(numE, m.layers[k].num_experts); });
      var rowKey = m.keys.filter(function (k) { return m.layers[k].num_experts === numE; })[0];
      var table = el("table", { cls: "heat", "data-model": String(mi) });
      var head = el("tr", {}, [el("th", { text: "expert" })]);
      m.keys.forEach(function (k) { head.appendChild(el("th", { text: k, cls: k === state.key ? "current" : "" })); });
      table.appendChild(head);
      for (var e = 0; e < numE; e++) {
        var tr = el("tr", {}, [el("th", {}, [chip(e, m.layers[rowKey].num_experts)])]);
        m.keys.forEach(function (k) {
          var v = e < m.layers[k].load.length ? m.layers[k].load[e] : null;
          var td = el("td", { cls: "heat" + (k === state.key ? " current" : ""), text: v === null ? "" : (100 * v).toFixed(0),
            title: v === null ? "" : m.label + " " + k + " expert " + e + ": " + (100 * v).toFixed(2) + "% of routed sub-tokens" });
          td.style.background = heatColor(v, vmax);
          td.style.color = v !== null && v > vmax / 2 ? "#000" : "#fff";
          tr.appendChild(td);
        });
        table.appendChild(tr);
      }
      var ratio = el("tr", {}, [el("th", { text: "active" })]);
      m.keys.forEach(function (k) { ratio.appendChild(el("td", { text: (100 * m.layers[k].activation_ratio).toFixed(0) + "%" })); });
      table.appendChild(ratio);
      box.appendChild(el("div", {}, [el("h3", { text: m.label }), table]));
    });
  }

  function render() {
    renderPanels();
    renderText();
    renderHeat();
  }

  /* ------------------------------------------------------------------ self-check */

  function readDetail(panel) {
    var rows = panel.querySelectorAll(".patch-detail tr[data-head]");
    return Array.prototype.map.call(rows, function (tr) {
      return {
        experts: Array.prototype.map.call(tr.querySelectorAll(".chip"), function (c) { return +c.dataset.expert; }),
        gates: Array.prototype.map.call(tr.querySelectorAll(".gate"), function (g) { return +g.dataset.gate; }),
      };
    });
  }

  function selfTest() {
    var out = { layers: [], images: DATA.inputs.length, models: DATA.models.length, checks: [] };
    var layerSelect = document.getElementById("layer-select");
    out.layer_options = Array.prototype.map.call(layerSelect.options, function (o) { return o.value; });
    out.view_options = Array.prototype.map.call(document.getElementById("view-select").options, function (o) { return o.value; });
    var imgSelect = document.getElementById("image-select");
    var first = DATA.models[0].images.findIndex(function (u) { return u !== null; });
    if (first >= 0) { imgSelect.value = String(first); imgSelect.dispatchEvent(new Event("change")); }
    out.input = state.input;
    out.layer_options.forEach(function (key) {
      layerSelect.value = key;
      layerSelect.dispatchEvent(new Event("change"));
      var rec = { key: key, models: [] };
      DATA.models.forEach(function (m, mi) {
        var panel = document.querySelector('.model-panel[data-model="' + mi + '"]');
        var cells = panel.querySelectorAll(".patch");
        var info = { label: m.label, cells: cells.length };
        if (cells.length) {
          var r = m.grid[0] - 1, c = Math.min(1, m.grid[1] - 1);
          var target = panel.querySelector('.patch[data-r="' + r + '"][data-c="' + c + '"]');
          target.dispatchEvent(new MouseEvent("mouseover", { bubbles: true }));
          info.hover = { r: r, c: c, routes: readDetail(panel), color: getComputedStyle(target).backgroundColor };
          target.dispatchEvent(new MouseEvent("mouseout", { bubbles: true }));
          info.hint_after_mouseout = !!panel.querySelector(".patch-detail .hint");
          var other = panel.querySelector('.patch[data-r="0"][data-c="0"]');
          other.dispatchEvent(new MouseEvent("click", { bubbles: true }));
          other.dispatchEvent(new MouseEvent("mouseout", { bubbles: true }));
          info.pinned = { r: 0, c: 0, routes: readDetail(panel), marked: other.classList.contains("pinned") };
          other.dispatchEvent(new MouseEvent("click", { bubbles: true }));
        }
        var text = document.querySelector('.text-model[data-model="' + mi + '"]');
        info.tokens = text ? text.querySelectorAll(".token").length : 0;
        info.words = text ? Array.prototype.map.call(text.querySelectorAll(".word"), function (w) { return w.dataset.word; }) : [];
        var heat = document.querySelector('table.heat[data-model="' + mi + '"]');
        info.heat_cells = heat ? heat.querySelectorAll("td.heat").length : 0;
        rec.models.push(info);
      });
      out.layers.push(rec);
    });
    out.ok = true;
    var pre = document.getElementById("selftest-result");
    pre.textContent = JSON.stringify(out);
    document.body.setAttribute("data-selftest", "done");
  }

  buildControls();
  buildPanels();
  var firstImage = DATA.models[0].images.findIndex(function (u) { return u !== null; });
  state.input = firstImage >= 0 ? firstImage : 0;
  document.getElementById("image-select").value = String(state.input);
  /* a link can open the page on a layer and a pinned patch: index.html#layer=layer3&pin=2,5 */
  var params = new URLSearchParams(window.location.hash.slice(1));
  if (params.get("layer") && allKeys().indexOf(params.get("layer")) >= 0) {
    state.key = params.get("layer");
    document.getElementById("layer-select").value = state.key;
  }
  var pin = (params.get("pin") || "").split(",").map(Number);
  if (pin.length === 2 && pin.every(function (v) { return Number.isInteger(v) && v >= 0; })) state.pinned = pin;
  render();
  if (/selftest/.test(window.location.search + window.location.hash)) {
    try { selfTest(); } catch (err) {
      document.getElementById("selftest-result").textContent = JSON.stringify({ ok: false, error: String(err && err.stack || err) });
      document.body.setAttribute("data-selftest", "error");
    }
  }
})();

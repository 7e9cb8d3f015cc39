"""The report page's inline stylesheet and script (see :mod:`lora_prune.report`).

``CSS`` takes ``%(opacity)s``, the heatmaps' starting opacity. The script reads
only the page's own controls and ``data-*`` attributes, never report data.
"""

CSS = """
:root { --heatmap-opacity: %(opacity)s; --fg: #1d2125; --muted: #69707a; --line: #dde1e6;
  --accent: #2f6ec4; color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--fg); background: #f6f7f9; }
main { max-width: 1280px; margin: 0 auto; padding: 20px 28px 60px; }
header { background: #1d2733; color: #fff; padding: 18px 28px; }
header h1 { margin: 0; font-size: 22px; font-weight: 600; word-break: break-all; }
header p { margin: 4px 0 0; color: #b9c3cf; }
nav { margin-top: 8px; } nav a { color: #9cc3ff; margin-right: 14px; text-decoration: none; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 6px 20px 18px;
  margin: 18px 0; }
h2 { font-size: 18px; margin: 14px 0 8px; } h3 { font-size: 15px; margin: 18px 0 4px; }
.muted { color: var(--muted); font-weight: normal; }
code, pre { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 12.5px; }
code.hash { word-break: break-all; }
table { border-collapse: collapse; }
table.kv th { text-align: left; font-weight: 600; padding: 3px 18px 3px 0; vertical-align: top;
  white-space: nowrap; color: #3b434c; }
table.kv td { padding: 3px 0; } ol.prompts { margin: 0; padding: 0; list-style: none; }
.refs { display: flex; flex-wrap: wrap; gap: 18px; }
figure { margin: 0; } .ref-pair .pair { display: flex; gap: 8px; }
.ref-image img { width: 200px; height: auto; display: block; border-radius: 4px; }
.ref-pair > figcaption { max-width: 408px; margin-top: 4px; }
.ref-image figcaption, .tile figcaption { font-size: 12px; color: var(--muted); }
.prompt { font-style: italic; overflow-wrap: anywhere; }
#influence-chart { max-width: 100%%; height: auto; display: block; }
details img { max-width: 100%%; margin-top: 8px; }
table.ranking { width: 100%%; font-variant-numeric: tabular-nums; margin-top: 6px; }
table.ranking th, table.ranking td { padding: 4px 10px; border-bottom: 1px solid var(--line); }
table.ranking th { text-align: left; background: #eef1f5; cursor: pointer; user-select: none;
  white-space: nowrap; position: sticky; top: 0; }
table.ranking th:hover { background: #e2e8f0; }
table.ranking th::after { content: " \\2195"; color: #a6adb6; }
table.ranking th[aria-sort=ascending]::after { content: " \\25B2"; color: var(--accent); }
table.ranking th[aria-sort=descending]::after { content: " \\25BC"; color: var(--accent); }
table.ranking td.num { text-align: right; white-space: nowrap; }
table.ranking tbody tr:hover { background: #f3f6fa; }
tr.kept td.block { font-weight: 600; }
td.mse { position: relative; } td.mse span:not(.bar) { position: relative; }
.bar { position: absolute; left: 0; top: 3px; bottom: 3px; background: #dce8f8; border-radius: 2px; }
.dot { display: inline-block; width: 9px; height: 9px; border-radius: 50%%; margin-right: 7px; }
.keep-badge { font-size: 11px; background: #e3f3e6; color: #23733a; border-radius: 3px;
  padding: 0 5px; margin-left: 6px; font-weight: 600; }
.chip { background: #eef1f5; border-radius: 3px; padding: 1px 5px; }
.command { position: relative; margin-top: 10px; }
.command pre { background: #1d2733; color: #e7edf4; padding: 12px 70px 12px 14px; border-radius: 6px;
  overflow-x: auto; margin: 0; white-space: pre-wrap; word-break: break-all; }
#copy-command { position: absolute; right: 8px; top: 8px; }
.controls { display: flex; flex-wrap: wrap; gap: 18px; align-items: center; padding: 8px 0 12px;
  position: sticky; top: 0; background: #fff; z-index: 2; border-bottom: 1px solid var(--line); }
.controls label { display: flex; align-items: center; gap: 6px; }
.legend { display: inline-flex; margin-left: 12px; vertical-align: middle; align-items: center; gap: 6px; font-size: 12px; color: var(--muted); }
.legend .gradient { width: 140px; height: 10px; border-radius: 2px; display: inline-block; }
.group-caption { margin: 12px 0 8px; }
.tiles { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 12px; }
.stack { position: relative; line-height: 0; background: #e9ecf0; border-radius: 4px; overflow: hidden; }
.stack img { display: block; width: 100%%; height: auto; }
.stack img.heatmap { position: absolute; left: 0; top: 0; height: 100%%; opacity: var(--heatmap-opacity);
  pointer-events: none; }
body.no-heatmaps img.heatmap { display: none; }
body.small-renders .stack img, body.small-renders .ref-image img { image-rendering: pixelated; }
.reference-tile .stack { outline: 2px dashed #a6adb6; outline-offset: -2px; }
[hidden] { display: none !important; }
footer { color: var(--muted); font-size: 12px; text-align: center; margin-top: 24px; }
"""

JS = """
(function () {
  'use strict';
  function sortValue(row, index) {
    var text = row.cells[index].getAttribute('data-value');
    if (text === null || text === '') { return null; }
    var value = parseFloat(text);
    return isNaN(value) ? null : value;
  }
  function order(row) { return parseFloat(row.cells[0].getAttribute('data-value')); }
  function sortTable(table, th) {
    var current = th.getAttribute('aria-sort');
    var dir = current === 'ascending' ? 'descending'
      : current === 'descending' ? 'ascending'
      : (th.getAttribute('data-default') === 'desc' ? 'descending' : 'ascending');
    Array.prototype.forEach.call(table.querySelectorAll('th[data-key]'), function (h) {
      h.removeAttribute('aria-sort');
    });
    th.setAttribute('aria-sort', dir);
    var index = th.cellIndex, sign = dir === 'ascending' ? 1 : -1;
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = sortValue(a, index), y = sortValue(b, index);
      // Unmeasured values go last whichever the direction; ties keep model order.
      if (x === null || y === null) {
        if (x !== y) { return x === null ? 1 : -1; }
      } else if (x !== y) { return (x - y) * sign; }
      return order(a) - order(b);
    });
    rows.forEach(function (row) { body.appendChild(row); });
  }
  Array.prototype.forEach.call(document.querySelectorAll('table.sortable'), function (table) {
    Array.prototype.forEach.call(table.querySelectorAll('th[data-key]'), function (th) {
      th.tabIndex = 0;
      th.addEventListener('click', function () { sortTable(table, th); });
      th.addEventListener('keydown', function (event) {
        if (event.key === 'Enter' || event.key === ' ') { event.preventDefault(); sortTable(table, th); }
      });
    });
  });

  var toggle = document.getElementById('heatmap-toggle');
  var slider = document.getElementById('heatmap-opacity');
  var shown = document.getElementById('heatmap-opacity-value');
  function applyToggle() { document.body.classList.toggle('no-heatmaps', !toggle.checked); }
  function applyOpacity() {
    document.documentElement.style.setProperty('--heatmap-opacity', slider.value);
    if (shown) { shown.textContent = Number(slider.value).toFixed(2); }
  }
  // Browsers restore form state on reload: start from what the inputs say.
  if (toggle) { toggle.addEventListener('change', applyToggle); applyToggle(); }
  if (slider) { slider.addEventListener('input', applyOpacity); slider.addEventListener('change', applyOpacity); applyOpacity(); }

  var controls = document.querySelector('#gallery .controls');
  var modeSelect = document.getElementById('gallery-mode');
  var refSelect = document.getElementById('gallery-ref');
  function showGroup() {
    var mode = modeSelect ? modeSelect.value : controls.getAttribute('data-default-mode');
    var ref = refSelect ? refSelect.value : controls.getAttribute('data-default-ref');
    Array.prototype.forEach.call(document.querySelectorAll('.gallery-group'), function (group) {
      group.hidden = !(group.getAttribute('data-mode') === mode && group.getAttribute('data-ref') === ref);
    });
  }
  if (controls) {
    if (modeSelect) { modeSelect.addEventListener('change', showGroup); }
    if (refSelect) { refSelect.addEventListener('change', showGroup); }
    showGroup();
  }

  var copy = document.getElementById('copy-command');
  var code = document.getElementById('slim-command');
  if (copy && code) {
    copy.addEventListener('click', function () {
      function done() { copy.textContent = 'copied'; setTimeout(function () { copy.textContent = 'copy'; }, 1500); }
      function fallback() {
        // file:// pages often get no clipboard API: select the text and copy it the old way.
        var range = document.createRange();
        range.selectNodeContents(code);
        var selection = window.getSelection();
        selection.removeAllRanges();
        selection.addRange(range);
        try { if (document.execCommand('copy')) { done(); } } catch (e) { /* text stays selected */ }
      }
      if (navigator.clipboard && navigator.clipboard.writeText) {
        navigator.clipboard.writeText(code.textContent).then(done, fallback);
      } else { fallback(); }
    });
  }
})();
"""

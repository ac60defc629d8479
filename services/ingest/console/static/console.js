// Huitou console: draws the charts of the page from the JSON the server put in it.
// No inline script anywhere (the Content-Security-Policy forbids it): each chart is a
// <div data-chart="kind" data-source="id of a <script type=application/json>">.
(function () {
  "use strict";

  function funnel(el, data) {
    var chart = window.echarts.init(el);
    chart.setOption({
      aria: { enabled: true },
      tooltip: { trigger: "item", formatter: "{b}: {c}" },
      series: [{
        type: "funnel",
        sort: "none",
        minSize: "8%",
        label: { show: true, position: "inside", formatter: "{b} {c}" },
        data: data.map(function (d) { return { name: d.name, value: d.value, stage: d.stage }; })
      }]
    });
    chart.on("click", function (p) {
      window.location.href = "/console/customers?stage=" + encodeURIComponent(p.data.stage);
    });
    window.addEventListener("resize", function () { chart.resize(); });
  }

  function bars(el, data) {
    var chart = window.echarts.init(el);
    chart.setOption({
      aria: { enabled: true },
      tooltip: { trigger: "axis" },
      grid: { left: 40, right: 20, top: 20, bottom: 30 },
      xAxis: { type: "category", data: data.map(function (d) { return d[0]; }) },
      yAxis: { type: "value", minInterval: 1 },
      series: [{ type: "bar", data: data.map(function (d) { return d[1]; }) }]
    });
    window.addEventListener("resize", function () { chart.resize(); });
  }

  var kinds = { funnel: funnel, bars: bars };

  // The segment builder's live count: the form posted (with the session's CSRF token)
  // to the console on every change, the answer shown in its <output>.
  function liveCount(form) {
    var output = form.querySelector("output");
    var pending = null;
    function update() {
      var body = new URLSearchParams(new FormData(form));
      fetch(form.getAttribute("data-count-url"), {
        method: "POST",
        credentials: "same-origin",
        headers: { "X-CSRF-Token": form.getAttribute("data-csrf") },
        body: body
      }).then(function (r) { return r.json(); }).then(function (answer) {
        output.textContent = answer.count === null ? answer.error : String(answer.count);
        form.setAttribute("data-counted", body.toString());
      });
    }
    form.addEventListener("input", function () {
      clearTimeout(pending);
      pending = setTimeout(update, 250);
    });
    update();
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("form[data-count-url]").forEach(liveCount);
    document.querySelectorAll("[data-chart]").forEach(function (el) {
      var source = document.getElementById(el.getAttribute("data-source"));
      var draw = kinds[el.getAttribute("data-chart")];
      if (source && draw && window.echarts) {
        draw(el, JSON.parse(source.textContent));
        el.setAttribute("data-drawn", "true");
      }
    });
  });
})();

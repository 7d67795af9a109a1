/* Grid tiles whose variants are still being made (li[data-pending]) are polled from the
   tiles endpoint and swapped in as their tiers land: a new upload shows without a reload.
   Polls only while such tiles exist, backs off while nothing changes, pauses in hidden
   tabs and gives up after a while. */
(function () {
  "use strict";
  var script = document.currentScript;
  var endpoint = script && script.getAttribute("data-endpoint");
  if (!endpoint || !window.fetch) return;
  var FIRST_DELAY = 1000, MAX_DELAY = 15000, GIVE_UP_MS = 15 * 60 * 1000;
  var delay = FIRST_DELAY, started = Date.now();

  function swap(li, tile) {
    var changed = String(tile.ready_max_width) !== li.getAttribute("data-ready");
    if (changed) {
      var box = li.querySelector(".ph"), tpl = document.createElement("template");
      tpl.innerHTML = tile.html.trim();
      var fresh = tpl.content.firstElementChild;
      if (box && fresh) {
        box.replaceWith(fresh);
        if (window.picsiteBlurhash && fresh.hasAttribute("data-blurhash")) window.picsiteBlurhash.paint(fresh);
      }
      li.setAttribute("data-ready", String(tile.ready_max_width));
    }
    if (tile.complete) li.removeAttribute("data-pending");
    return changed;
  }

  function poll() {
    var lis = document.querySelectorAll("li[data-tile][data-pending]");
    if (!lis.length || Date.now() - started > GIVE_UP_MS) return;
    if (document.hidden) {
      setTimeout(poll, delay);
      return;
    }
    var byId = {}, ids = [];
    for (var i = 0; i < lis.length; i++) {
      var id = lis[i].getAttribute("data-tile");
      byId[id] = lis[i];
      ids.push(id);
    }
    fetch(endpoint + "?ids=" + ids.join(","), { headers: { Accept: "application/json" } })
      .then(function (response) {
        return response.ok ? response.json() : Promise.reject(response.status);
      })
      .then(
        function (body) {
          var progressed = false, seen = {};
          body.tiles.forEach(function (tile) {
            seen[tile.id] = true;
            if (byId[tile.id] && swap(byId[tile.id], tile)) progressed = true;
          });
          ids.forEach(function (id) {
            if (!seen[id]) byId[id].removeAttribute("data-pending"); /* deleted meanwhile */
          });
          delay = progressed ? FIRST_DELAY : Math.min(MAX_DELAY, delay * 1.5);
        },
        function () {
          delay = Math.min(MAX_DELAY, delay * 2);
        }
      )
      .then(function () {
        setTimeout(poll, delay);
      });
  }
  setTimeout(poll, delay);
})();

/* Blurhash placeholders: paint each [data-blurhash] box's hash on a small canvas
   (CSS stretches it), and fade it once the real image has loaded.
   Decoder after https://github.com/woltapp/blurhash (MIT). */
(function () {
  "use strict";
  var CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz#$%*+,-.:;=?@[]^_{|}~";

  function d83(s) {
    var v = 0;
    for (var i = 0; i < s.length; i++) {
      var c = CHARS.indexOf(s[i]);
      if (c < 0) throw new Error("bad blurhash");
      v = v * 83 + c;
    }
    return v;
  }
  function toLinear(v) {
    v /= 255;
    return v <= 0.04045 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4);
  }
  function toSRGB(v) {
    v = Math.max(0, Math.min(1, v));
    return v <= 0.0031308 ? Math.round(v * 12.92 * 255 + 0.5) : Math.round((1.055 * Math.pow(v, 1 / 2.4) - 0.055) * 255 + 0.5);
  }
  function signPow(v, e) { return (v < 0 ? -1 : 1) * Math.pow(Math.abs(v), e); }

  function decode(hash, w, h) {
    var size = d83(hash[0]), nx = (size % 9) + 1, ny = Math.floor(size / 9) + 1;
    if (hash.length !== 4 + 2 * nx * ny) throw new Error("bad blurhash length");
    var max = (d83(hash[1]) + 1) / 166, colors = [], i, j, x, y;
    var dc = d83(hash.substring(2, 6));
    colors.push([toLinear(dc >> 16), toLinear((dc >> 8) & 255), toLinear(dc & 255)]);
    for (i = 1; i < nx * ny; i++) {
      var ac = d83(hash.substring(4 + i * 2, 6 + i * 2));
      colors.push([
        signPow((Math.floor(ac / 361) - 9) / 9, 2) * max,
        signPow(((Math.floor(ac / 19) % 19) - 9) / 9, 2) * max,
        signPow(((ac % 19) - 9) / 9, 2) * max
      ]);
    }
    var px = new Uint8ClampedArray(w * h * 4);
    for (y = 0; y < h; y++) {
      for (x = 0; x < w; x++) {
        var r = 0, g = 0, b = 0;
        for (j = 0; j < ny; j++) {
          var by = Math.cos((Math.PI * y * j) / h);
          for (i = 0; i < nx; i++) {
            var basis = Math.cos((Math.PI * x * i) / w) * by, c = colors[i + j * nx];
            r += c[0] * basis; g += c[1] * basis; b += c[2] * basis;
          }
        }
        var o = 4 * (x + y * w);
        px[o] = toSRGB(r); px[o + 1] = toSRGB(g); px[o + 2] = toSRGB(b); px[o + 3] = 255;
      }
    }
    return px;
  }

  function paint(box) {
    var hash = box.getAttribute("data-blurhash"), rect = box.getBoundingClientRect();
    var ratio = rect.width && rect.height ? rect.width / rect.height : 1;
    var w = ratio >= 1 ? 32 : Math.max(4, Math.round(32 * ratio));
    var h = ratio >= 1 ? Math.max(4, Math.round(32 / ratio)) : 32;
    try {
      var canvas = document.createElement("canvas");
      canvas.width = w; canvas.height = h;
      canvas.setAttribute("aria-hidden", "true");
      var ctx = canvas.getContext("2d"), data = ctx.createImageData(w, h);
      data.data.set(decode(hash, w, h));
      ctx.putImageData(data, 0, 0);
      box.insertBefore(canvas, box.firstChild);
    } catch (e) {
      return; /* a bad hash just leaves the plain background */
    }
    var img = box.querySelector("img");
    if (!img) return;
    var done = function () { box.classList.add("is-loaded"); };
    if (img.complete && img.naturalWidth) done();
    else img.addEventListener("load", done, { once: true });
  }

  // tiles.js paints the tiles it swaps in.
  window.picsiteBlurhash = { paint: paint };

  function run() {
    var boxes = document.querySelectorAll("[data-blurhash]");
    for (var i = 0; i < boxes.length; i++) paint(boxes[i]);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", run);
  else run();
})();

// A tool written with Node's built-in http module: echoes, as JSON, what it parsed.
// node node_echo.js PORT. GET /_count (straight to it, not through Regate): requests served.
"use strict";
const http = require("http");
const querystring = require("querystring");

let seen = 0;

function decode(s) {
  try { return decodeURIComponent(s); } catch (e) { return null; }
}

const server = http.createServer({ maxHeaderSize: 1 << 20 }, (req, res) => {
  if (req.url === "/_count") {
    res.setHeader("Content-Type", "application/json");
    res.end(JSON.stringify({ n: seen }));
    return;
  }
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    seen += 1;
    const url = new URL(req.url, "http://localhost");
    const raw = req.url.includes("?") ? req.url.slice(req.url.indexOf("?") + 1) : "";
    const qs = querystring.parse(raw);
    const out = {
      server: "node",
      // Both stay percent-encoded; a tool decodes them (null: decodeURIComponent threw).
      paths: {
        "decodeURIComponent(url.pathname)": decode(url.pathname),
        "decodeURIComponent(req.url before ?)": decode(req.url.split("?")[0]),
      },
      pairs: { "url.searchParams": [...url.searchParams.entries()] },
      dicts: {
        // Object.fromEntries keeps the last value; querystring.parse gives an array for a repeat.
        "Object.fromEntries(searchParams)": Object.fromEntries(url.searchParams),
        "querystring.parse": qs,  // a null-prototype object: __proto__ is a plain key
      },
      json: {},
      form: [],
      content_type: req.headers["content-type"] === undefined ? null : req.headers["content-type"],
      judged: req.headers["x-judged"] === undefined ? null : req.headers["x-judged"],
    };
    const body = Buffer.concat(chunks);
    if (body.length) {
      try { out.json["JSON.parse(body)"] = JSON.parse(body.toString("utf8")); } catch (e) { /* not JSON */ }
      const ctype = (req.headers["content-type"] || "").split(";")[0].trim().toLowerCase();
      if (ctype === "application/x-www-form-urlencoded") {
        out.form = Object.entries(querystring.parse(body.toString("utf8"))).flatMap(
          ([k, v]) => (Array.isArray(v) ? v : [v]).map((x) => [k, x]));
      }
    }
    res.setHeader("Content-Type", "application/json");
    res.end(JSON.stringify(out));
  });
});

server.listen(Number(process.argv[2]), "127.0.0.1");

// The committed generated files are current, and the package installs and
// imports as an npm package would (its exports, its browser build).
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { PKG } from "../testlib/helpers.js";

const run = (script, ...args) => execFileSync(process.execPath, [join(PKG, "scripts", script), ...args],
  { cwd: PKG, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });

test("src/proto.js and src/lz4dict-1.js match fanout.proto, lz4dict-1.bin and wire.py's SHA-256", () => {
  run("gen.mjs", "--check");
});

test("dist/fanout.browser.js is a fresh build of fanout.js", () => {
  run("build.mjs", "--check");
});

test("the browser build is one ES module without bare imports, with the same API", async () => {
  const text = readFileSync(join(PKG, "dist", "fanout.browser.js"), "utf8");
  assert.doesNotMatch(text, /\bimport\s*[^(]*?from\s*["'][^./]/, "a bare import is left");
  assert.doesNotMatch(text, /\brequire\s*\(/, "a require() is left");
  const browser = await import(join(PKG, "dist", "fanout.browser.js"));
  const main = await import(join(PKG, "fanout.js"));
  assert.deepEqual(Object.keys(browser).sort(), Object.keys(main).sort());
  const frame = browser.encodeFrame(browser.FrameType.PING, { nonce: 7 });
  assert.equal(Buffer.from(frame).toString("hex"), "01050000000000020807");
});

test("package.json: ES module with types, exports and files for an install from the repo", () => {
  const pkg = JSON.parse(readFileSync(join(PKG, "package.json"), "utf8"));
  assert.equal(pkg.type, "module");
  assert.equal(pkg.types, "./fanout.d.ts");
  assert.equal(pkg.exports["."].default, "./fanout.js");
  assert.equal(pkg.exports["."].browser, "./dist/fanout.browser.js");
  for (const f of ["fanout.js", "fanout.d.ts", "src/", "dist/"]) assert.ok(pkg.files.includes(f), f);
  // Every runtime import of the package resolves to a shipped file or a dependency.
  const packed = JSON.parse(execFileSync("npm", ["pack", "--dry-run", "--json"], { cwd: PKG, encoding: "utf8" }));
  const files = new Set(packed[0].files.map((f) => f.path));
  for (const f of ["fanout.js", "fanout.d.ts", "src/wire.js", "src/lz4.js", "src/proto.js",
    "src/lz4dict-1.js", "src/heartbeat.js", "src/race.js", "dist/fanout.browser.js", "README.md", "package.json"]) {
    assert.ok(files.has(f), `npm pack leaves out ${f}`);
  }
  assert.ok(![...files].some((f) => f.startsWith("test") || f.startsWith("node_modules")));
});

test("fanout.d.ts names every Reason of fanout.proto, with its code", async () => {
  const { Reason } = await import(join(PKG, "fanout.js"));
  const dts = readFileSync(join(PKG, "fanout.d.ts"), "utf8");
  for (const name of Object.keys(Reason).filter((k) => Number.isNaN(Number(k)))) {
    assert.match(dts, new RegExp(`readonly ${name}: ${Reason[name]};`), `fanout.d.ts lacks Reason.${name}`);
  }
});

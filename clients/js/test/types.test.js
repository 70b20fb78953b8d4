// fanout.d.ts: an application's typical use compiles under --strict, and
// misuses do not (tsc on test/types/*.ts, importing the package by name).
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { PKG } from "../testlib/helpers.js";

const TSC = join(PKG, "node_modules", "typescript", "bin", "tsc");
function tsc(file) {
  // The package resolves itself by name through its "exports" (self-reference).
  return spawnSync(process.execPath, [TSC, "--noEmit", "--strict", "--module", "nodenext",
    "--moduleResolution", "nodenext", "--target", "es2022", "--lib", "es2022,dom", "--types", "",
    "--skipLibCheck", join(PKG, "test", "types", file)], { cwd: PKG, encoding: "utf8" });
}

test("typical use type-checks", () => {
  const r = tsc("usage.ts");
  assert.equal(r.status, 0, r.stdout + r.stderr);
});

test("misuses are type errors", () => {
  const r = tsc("errors.ts");
  assert.notEqual(r.status, 0);
  const lines = new Set([...r.stdout.matchAll(/errors\.ts\((\d+),/g)].map((m) => Number(m[1])));
  assert.deepEqual([...lines].sort((a, b) => a - b), [5, 6, 7, 8], r.stdout);
});

// Builds dist/fanout.browser.js: fanout.js with protobufjs/minimal, long and
// the LZ4 dictionary bundled into one ES module with no bare imports, so a
// page can `import { Client } from "./fanout.browser.js"` without a bundler.
// `--check` fails if the committed file differs from a fresh build.
import { build } from "esbuild";
import { readFileSync, writeFileSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const pkg = join(dirname(fileURLToPath(import.meta.url)), "..");
const outfile = join(pkg, "dist", "fanout.browser.js");

export async function bundle() {
  const result = await build({
    entryPoints: [join(pkg, "fanout.js")],
    bundle: true,
    format: "esm",
    platform: "browser",
    target: ["es2020"],
    minify: true,
    legalComments: "eof",
    write: false,
    logLevel: "warning",
    banner: { js: "// @fanout/client browser build (scripts/build.mjs): do not edit." },
  });
  return result.outputFiles[0].text;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const text = await bundle();
  if (process.argv.includes("--check")) {
    let old = null;
    try { old = readFileSync(outfile, "utf8"); } catch { /* missing */ }
    if (old !== text) { console.error(`stale: ${outfile} (npm run build)`); process.exit(1); }
  } else {
    mkdirSync(dirname(outfile), { recursive: true });
    writeFileSync(outfile, text);
    console.log(`wrote ${outfile} (${text.length} bytes)`);
  }
}

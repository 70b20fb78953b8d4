// Shared by the tests: the repository paths and the Python that runs nodes.
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

export const PKG = join(dirname(fileURLToPath(import.meta.url)), "..");
export const REPO = join(PKG, "..", "..");

/** $FANOUT_PYTHON, else the repository's .venv, else python3. */
export function python() {
  if (process.env.FANOUT_PYTHON) return process.env.FANOUT_PYTHON;
  const venv = join(REPO, ".venv", "bin", "python");
  return existsSync(venv) ? venv : "python3";
}

export const hex = (s) => new Uint8Array(Buffer.from(s, "hex"));
export const toHex = (b) => Buffer.from(b).toString("hex");

// Builds the widget: `node build.mjs [--out DIR]` (DIR defaults to ../../target/widget).
//
// 1. buf generate: TypeScript from the webchat contract, so the widget cannot drift from it.
// 2. tsc --noEmit: the strict type check; esbuild strips types without checking them.
// 3. esbuild: hafen-widget.css first, then hafen-widget.js, one minified IIFE for ES2020
//    browsers, with the stylesheet's integrity compiled in (the widget pins its stylesheet as
//    the tenant's SRI hash pins the script). No source map: the files are what tenants pin.
// 4. manifest.json beside them: integrity and sizes per file, for the service and the docs.
// 5. Prints the SRI hashes, gzipped sizes and an embed tag; fails when the gzipped script is
//    over the budget (a widget is loaded on every page of a tenant's website).
//
// The summary goes to stdout, errors to stderr, nothing else. Runs on Node.js 20 with nothing
// global: the tools come from node_modules (`npm ci`).

import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { delimiter, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";
import * as esbuild from "esbuild";

const HERE = dirname(fileURLToPath(import.meta.url));
/** Gzipped bytes the script may have (60 kB). */
const JS_GZIP_BUDGET = 60_000;

function parseArgs(argv) {
  let out = join(HERE, "..", "..", "target", "widget");
  for (let i = 0; i < argv.length; i += 1) {
    if (argv[i] === "--out" && argv[i + 1]) {
      out = resolve(argv[i + 1]);
      i += 1;
    } else if (argv[i].startsWith("--out=")) {
      out = resolve(argv[i].slice("--out=".length));
    } else {
      throw new Error(`unknown argument ${argv[i]} (usage: node build.mjs [--out DIR])`);
    }
  }
  return { out };
}

function log(message) {
  process.stderr.write(`widget: ${message}\n`);
}

/** Runs a tool from node_modules/.bin in this directory, failing the build when it fails. */
function run(tool, args) {
  const bin = join(HERE, "node_modules", ".bin");
  execFileSync(join(bin, tool), args, {
    cwd: HERE,
    stdio: ["ignore", "inherit", "inherit"],
    // buf finds protoc-gen-es (buf.gen.yaml: `local: protoc-gen-es`) on PATH.
    env: { ...process.env, PATH: `${bin}${delimiter}${process.env.PATH ?? ""}` },
  });
}

function describe(bytes) {
  return {
    integrity: `sha384-${createHash("sha384").update(bytes).digest("base64")}`,
    bytes: bytes.length,
    gzip_bytes: gzipSync(bytes, { level: 9 }).length,
  };
}

async function bundle(options) {
  const result = await esbuild.build({
    bundle: true,
    minify: true,
    write: false,
    logLevel: "warning",
    absWorkingDir: HERE,
    ...options,
  });
  const file = result.outputFiles[0];
  if (!file) {
    throw new Error(`esbuild wrote nothing for ${options.entryPoints}`);
  }
  return Buffer.from(file.contents);
}

async function main() {
  const { out } = parseArgs(process.argv.slice(2));

  run("buf", ["generate"]);
  run("tsc", ["--noEmit", "-p", "tsconfig.json"]);

  const css = await bundle({ entryPoints: ["src/widget.css"], outfile: "hafen-widget.css" });
  const cssInfo = describe(css);
  const js = await bundle({
    entryPoints: ["src/main.ts"],
    outfile: "hafen-widget.js",
    format: "iife",
    target: "es2020",
    platform: "browser",
    legalComments: "none",
    define: { __HAFEN_CSS_INTEGRITY__: JSON.stringify(cssInfo.integrity) },
  });
  const jsInfo = describe(js);

  mkdirSync(out, { recursive: true });
  writeFileSync(join(out, "hafen-widget.js"), js);
  writeFileSync(join(out, "hafen-widget.css"), css);
  const manifest = { "hafen-widget.js": jsInfo, "hafen-widget.css": cssInfo };
  writeFileSync(join(out, "manifest.json"), `${JSON.stringify(manifest, null, 2)}\n`);

  const kb = (n) => `${(n / 1000).toFixed(1)} kB`;
  const lines = [`widget built in ${out}`];
  for (const [name, info] of Object.entries(manifest)) {
    lines.push(`  ${name.padEnd(18)} ${kb(info.bytes).padStart(9)}, gzip ${kb(info.gzip_bytes).padStart(8)}  ${info.integrity}`);
  }
  lines.push(
    "embed:",
    `  <script src="https://HAFEN/widget/hafen-widget.js" data-widget="WIDGET-ID" data-endpoint="https://HAFEN" integrity="${jsInfo.integrity}" crossorigin="anonymous" defer></script>`,
  );
  process.stdout.write(`${lines.join("\n")}\n`);

  if (jsInfo.gzip_bytes > JS_GZIP_BUDGET) {
    log(`error: hafen-widget.js is ${kb(jsInfo.gzip_bytes)} gzipped, over the budget of ${kb(JS_GZIP_BUDGET)}`);
    process.exit(1);
  }
}

main().catch((err) => {
  log(`error: ${err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
});

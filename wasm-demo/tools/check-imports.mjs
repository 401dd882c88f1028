// Lists what each wasm module imports and fails if anything comes from `env`: such an import
// is a symbol the linker could not resolve (a C function, a missing shim) and the module
// would not instantiate in a browser.
//
// node wasm-demo/tools/check-imports.mjs <module.wasm>...
import { readFileSync } from "node:fs";

let failed = false;
for (const path of process.argv.slice(2)) {
  const module = new WebAssembly.Module(readFileSync(path));
  const imports = WebAssembly.Module.imports(module);
  const fromEnv = imports.filter((i) => i.module === "env");
  const modules = [...new Set(imports.map((i) => i.module))];
  console.log(
    `${path}: ${imports.length} imports from ${JSON.stringify(modules)}, ` +
      `${WebAssembly.Module.exports(module).length} exports`,
  );
  if (fromEnv.length > 0) {
    failed = true;
    console.error(`${path} imports from env: ${fromEnv.map((i) => i.name).join(", ")}`);
  }
}
if (process.argv.length < 3) {
  console.error("usage: check-imports.mjs <module.wasm>...");
  failed = true;
}
process.exit(failed ? 1 : 0);

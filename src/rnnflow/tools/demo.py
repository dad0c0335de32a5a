"""The browser demo: `make demo` (or `python -m rnnflow.tools.demo --port N`) builds a static
site from the champion bundle and serves it on 127.0.0.1.

The site (.web/site/) holds the page (src/rnnflow/shipping/web/: index.html, demo.mjs and a
JavaScript reader of the tokenizer.json files rnnflow writes), onnxruntime-web's wasm build
from the npm packages `make demo` installs into .web/node_modules, and the bundle's
model.onnx, tokenizer.json, labels.json and bundle.json. Everything is computed in the page;
the server only hands out files.
"""

import functools
import http.server
import json
import shutil
import sys
from pathlib import Path

from rnnflow.core.cliargs import CliParser, port_number
from rnnflow.core.errors import RnnflowError, run_cli
from rnnflow.core.paths import REPORTS, bundle_dir
from rnnflow.shipping.predict import BUNDLE_FILES

PAGE = Path(__file__).resolve().parents[1] / "shipping" / "web"
PAGE_FILES = ("index.html", "demo.mjs", "tokenizer.mjs")
WEB = Path(".web")  # npm's side of the house, as .venv is Python's
ORT_DIST = WEB / "node_modules" / "onnxruntime-web" / "dist"
# the wasm build the page imports, and the runtime it loads by itself
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
SITE = WEB / "site"
TYPES = {
    ".mjs": "text/javascript",
    ".wasm": "application/wasm",
    ".onnx": "application/octet-stream",
}


def champion_bundle(leaderboard: Path = REPORTS / "leaderboard.json") -> Path:
    """The bundle of the best variant that passed the parity gate (compare's champion)."""
    if not leaderboard.is_file():
        raise RnnflowError(f"{leaderboard}: missing; `make run` writes it (or pass --bundle)")
    for row in json.loads(leaderboard.read_text(encoding="utf-8")):
        if row.get("onnx_parity") == "pass":
            return bundle_dir(row["variant"])
    raise RnnflowError(f"{leaderboard}: no variant passed the parity gate")


def build_site(bundle: Path, site: Path = SITE, ort_dist: Path = ORT_DIST) -> Path:
    """Assemble the static site in a temporary folder, then put it in place of `site`."""
    missing = [f for f in BUNDLE_FILES if not (bundle / f).is_file()]
    if missing:
        raise RnnflowError(f"{bundle}: not a model bundle (missing {', '.join(missing)})")
    absent = [f for f in ORT_FILES if not (ort_dist / f).is_file()]
    if absent:
        raise RnnflowError(
            f"{ort_dist}: onnxruntime-web is not installed (missing {absent[0]}); `make demo` "
            "installs it with npm"
        )
    tmp = site.with_name(site.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "ort").mkdir(parents=True)
    (tmp / "bundle").mkdir()
    for name in PAGE_FILES:
        shutil.copy2(PAGE / name, tmp / name)
    for name in ORT_FILES:
        shutil.copy2(ort_dist / name, tmp / "ort" / name)
    for name in BUNDLE_FILES:
        shutil.copy2(bundle / name, tmp / "bundle" / name)
    shutil.rmtree(site, ignore_errors=True)
    tmp.rename(site)
    return site


class _Files(http.server.SimpleHTTPRequestHandler):
    """Static files with the types a module page needs, and no log line per request."""

    extensions_map = http.server.SimpleHTTPRequestHandler.extensions_map | TYPES

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


def serve(site: Path, port: int) -> http.server.ThreadingHTTPServer:
    """A static file server for `site` on 127.0.0.1:port (0: any free port)."""
    handler = functools.partial(_Files, directory=str(site))
    try:
        return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as err:
        raise RnnflowError(f"127.0.0.1:{port}: cannot serve there ({err.strerror})") from err


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(prog="python -m rnnflow.tools.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=port_number, default=8000, help="0 picks a free port")
    parser.add_argument("--bundle", type=Path, help="a bundle folder (default: the champion)")
    parser.add_argument("--build-only", action="store_true", help="build .web/site and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = parser.parse_args(argv)

    def run() -> None:
        site = build_site(args.bundle or champion_bundle())
        if args.build_only:
            print(f"demo: built {site}")
            return
        server = serve(site, args.port)
        host, port = server.server_address[:2]
        print(f"demo: http://{host}:{port}/ (Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()
        finally:
            server.server_close()

    run_cli(run, "demo")


if __name__ == "__main__":
    main(sys.argv[1:])

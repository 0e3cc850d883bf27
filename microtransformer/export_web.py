"""`export --format web`: a static folder that generates text in the browser.

    SITE/
      index.html, app.js, tokenizer.js   the page (from microtransformer/web/static)
      model.onnx                         one decoding step with a KV cache (WebDecodeStep)
      tokenizer.json                     the run's tokenizer, read by tokenizer.js
      model.json                         context length, EOS id, names and sizes for the page
      ort/                               ONNX Runtime Web (WebAssembly build), copied from the
                                         pinned npm package in interop/node_modules

Any static file host serves it (`python -m http.server -d SITE`); nothing is fetched from
elsewhere. Needs the `onnx` package (the exporter) and onnxruntime-web installed by
`npm ci` in interop/ (scripts/setup.sh dev does it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from microtransformer.errors import UserError
from microtransformer.export_gguf import check_tokenizer  # what tokenizer.js reproduces
from microtransformer.export_onnx import DEFAULT_OPSET
from microtransformer.fileio import atomic_write_bytes, atomic_write_json, fsync_dir
from microtransformer.hub import unwrap_model

ORT_PACKAGE = "onnxruntime-web"
ORT_VERSION = "1.31.1"  # interop/package.json pins the same
# The WebAssembly build's ES module, its loader and its binary (single-threaded use is fine).
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
PAGE_FILES = ("index.html", "app.js", "tokenizer.js")
ORT_ENV = "MICROTRANSFORMER_ORT_WEB_DIR"  # override: a folder holding ORT_FILES


class WebDecodeStep(nn.Module):
    """The page's ONNX graph: new tokens plus the previous keys/values in, the last position's
    logits plus the extended keys/values out, so each generated token costs one position.

    input_ids (1, T) int64, new tokens at positions P .. P+T-1; past (L, 2, 1, H, P, D) float32,
    the keys and values of the P tokens before them (P = 0: an empty cache, e.g. the prompt).
    Outputs: logits (1, V) of the last position; present (L, 2, 1, H, P+T, D). Once the text
    outgrows max_seq_len the page runs the last max_seq_len tokens with P = 0 each step, as
    `MicroTransformer.generate` recomputes its sliding window.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = unwrap_model(model)

    def forward(self, input_ids: torch.Tensor, past: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        T, P = input_ids.shape[1], past.shape[4]
        positions = torch.arange(T, device=input_ids.device) + P  # (T,)
        x, rope = m.embed(input_ids, positions)  # (1, T, C); rope None or (1, 1, T, D)
        keys = torch.arange(P + T, device=input_ids.device)  # (S,)
        mask = keys[None, :] <= positions[:, None]  # (T, S): causal over past + new
        presents = []
        for i, block in enumerate(m.blocks):
            attn = block.attn
            H, D = attn.num_heads, attn.head_dim
            q, k, v = attn.heads(block.ln1(x), rope)  # each (1, H, T, D)
            k = torch.cat([past[i, 0], k], dim=2)  # (1, H, S, D)
            v = torch.cat([past[i, 1], v], dim=2)
            presents.append(torch.stack([k, v]))  # (2, 1, H, S, D)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (1, H, T, D)
            x = x + attn.proj(y.transpose(1, 2).reshape(1, T, H * D))  # (1, T, C)
            x = x + block.ff(block.ln2(x))
        logits = m.lm_head(m.ln_f(x[:, -1]))  # (1, V)
        return logits, torch.stack(presents)  # (1, V), (L, 2, 1, H, S, D)


def export_decode_step(model: nn.Module, path: Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write WebDecodeStep as ONNX (TorchScript exporter; T and P are dynamic axes)."""

    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError as exc:
        raise UserError("--format web needs the onnx package: pip install onnx") from exc
    m = unwrap_model(model)
    cfg = m.config
    step = WebDecodeStep(m).eval()
    head_dim = cfg.embed_dim // cfg.num_heads
    ids = torch.randint(0, cfg.vocab_size, (1, 2))
    past = torch.randn(cfg.num_layers, 2, 1, cfg.num_heads, 3, head_dim)
    was_training = m.training
    m.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporter deprecation/tracer chatter
            torch.onnx.export(
                step, (ids, past), str(path), input_names=["input_ids", "past"],
                output_names=["logits", "present"], opset_version=opset, dynamo=False,
                dynamic_axes={"input_ids": {1: "tokens"}, "past": {4: "past_length"},
                              "present": {4: "length"}},
                do_constant_folding=True)
    finally:
        m.train(was_training)
    return path


def find_ort_web(search_from: Path | None = None) -> tuple[Path, str]:
    """(folder with ONNX Runtime Web's files, its version), or UserError with what to install.

    Looks at $MICROTRANSFORMER_ORT_WEB_DIR, then interop/node_modules/onnxruntime-web/dist of
    the source tree this package runs from, then of the current directory (and its parents),
    then ./node_modules.
    """
    candidates: list[Path] = []
    if os.environ.get(ORT_ENV):
        candidates.append(Path(os.environ[ORT_ENV]))
    for start in _search_roots(search_from):
        for folder in (start, *start.parents):
            candidates.append(folder / "interop" / "node_modules" / ORT_PACKAGE / "dist")
            candidates.append(folder / "node_modules" / ORT_PACKAGE / "dist")
            if (folder / ".git").exists():
                break
    for dist in candidates:
        if all((dist / name).is_file() for name in ORT_FILES):
            version = "unknown"
            pkg = dist.parent / "package.json"
            if pkg.is_file():
                version = json.loads(pkg.read_text(encoding="utf-8")).get("version", version)
            return dist, version
    raise UserError(
        f"--format web needs ONNX Runtime Web's files ({ORT_PACKAGE} {ORT_VERSION} from npm): "
        "install Node.js 20+ and run `npm ci` in the repository's interop/ folder (or "
        f"`npm install {ORT_PACKAGE}@{ORT_VERSION}` here)"
    )


def _search_roots(search_from: Path | None) -> list[Path]:
    """Where find_ort_web starts looking: this source tree, then the given or current folder."""
    return [Path(__file__).resolve().parents[1], (search_from or Path.cwd()).resolve()]


def page_info(model: nn.Module, tokenizer: Any, name: str, ort_version: str) -> dict[str, Any]:
    """model.json: what app.js needs to know about the model."""
    m = unwrap_model(model)
    return {
        "name": name,
        "num_layers": m.config.num_layers,
        "num_heads": m.config.num_heads,
        "head_dim": m.config.embed_dim // m.config.num_heads,
        "max_seq_len": m.config.max_seq_len,
        "vocab_size": m.config.vocab_size,
        "eos_token_id": int(tokenizer.eos_token_id),
        "tokenizer": "byte-level BPE" if tokenizer.kind == "bpe" else "character",
        "parameters": sum(p.numel() for p in m.parameters()),
        "onnxruntime_web": ort_version,
        "licenses": {"onnxruntime-web": "MIT (Microsoft Corporation)"},
    }


def export_web(model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any, *,
               force: bool = False, name: str | None = None) -> Path:
    """Write the static web page for `model` into `out_dir` (built beside it, renamed into
    place; an existing folder is replaced only with `force`). Returns the folder."""
    out = Path(out_dir)
    check_tokenizer(tokenizer, unwrap_model(model).config.vocab_size, "the web page")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UserError(f"output {out} is a file; --out must be a directory for --format web")
        if any(out.iterdir()) and not force:
            raise UserError(f"output {out} already exists; pass --force to overwrite it or "
                            "choose another --out")
    ort_dir, ort_version = find_ort_web()
    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        static = resources.files("microtransformer.web") / "static"
        for page_file in PAGE_FILES:
            atomic_write_bytes(build / page_file, (static / page_file).read_bytes())
        (build / "ort").mkdir()
        for ort_file in ORT_FILES:
            shutil.copyfile(ort_dir / ort_file, build / "ort" / ort_file)
        export_decode_step(model, build / "model.onnx")
        tokenizer.save(build / "tokenizer.json")
        atomic_write_json(build / "model.json",
                          page_info(model, tokenizer, name or out.name, ort_version))
        for folder in (build / "ort", build):
            fsync_dir(folder)
        os.chmod(build, 0o755)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
        os.replace(build, out)
        fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if build.exists():
            shutil.rmtree(build, ignore_errors=True)
    return out

"""Benchmark `convert-checkpoint` and `export-checkpoint` on a full-size synthetic Qwen3-1.8B checkpoint.

Writes a random checkpoint in the real layout (fixtures.QWEN3_1_8B_ARGS: MHA,
d_ff 5461, bf16 weights, `_orig_mod.` prefix, RoPE buffers, AdamW state with
bf16 moments: ~11 GB, like ckpt_160000.pt) into a temporary directory, converts
it in a subprocess, and reports the conversion's wall time and peak RSS (the
child's ru_maxrss). The checkpoint is written by another subprocess: on Linux a
child's ru_maxrss starts from its parent's peak (fork/exec), so the parent
must stay small for the figure to be the converter's own. Then, unless --no-verify, converts again with --verify and
reports that run separately. Then the way back: the source checkpoint is deleted (so the disk
holds at most the checkpoint and the converted model, ~15 GB) and the converted model is exported to
a .pt with `export-checkpoint`, and again with --verify (unless --no-verify), each timed the same way.
Deletes everything afterwards unless --keep.

    python benchmarks/convert_full_size.py [--workdir DIR] [--keep] [--no-verify] [--tokenizer qwen3|DIR]

The tokenizer is the built-in Qwen3 one (`--tokenizer qwen3`, the real run's), so the conversion
also loads and saves the 151,669-token tokenizer.

Targets: under 3 minutes, peak RSS under 2x the converted model
(loading the whole file would need 3x); stretch ~1x. The export has the same targets: it holds the
exported model (1x) and one tensor being read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from posttrain.demo import fixtures

RESULTS = Path(__file__).parent / "results" / "convert_full_size.json"


def write_checkpoint(path: Path) -> None:
    """The real layout at full size without needing the optimizer state in RAM:
    its moments are uninitialised tensors (their values never matter, and untouched
    pages cost nothing), so generating needs ~1x the model, not 3x."""
    fixtures.write_source_checkpoint(
        path,
        fixtures.QWEN3_1_8B_ARGS,
        optimizer_moment=lambda shape: torch.empty(shape, dtype=torch.bfloat16),
    )


def drop_from_page_cache(path: Path) -> None:
    """Evict the just-written checkpoint's pages so the conversion reads it from disk, as it would in real use."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_measured(*args: str) -> dict:
    """Run `python ARGS...` in a child process; return its wall time, peak RSS and output lines."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{output}")
    lines = [ln for ln in output.splitlines() if ln.startswith(("verify:", "wrote"))]
    return {"wall_s": round(wall, 1), "peak_rss_bytes": usage.ru_maxrss * 1024, "stdout": lines}


def run_convert(ckpt: Path, tokenizer: str, out: Path, *extra: str) -> dict:
    return run_measured(
        "-m", "posttrain.convert", str(ckpt), "--tokenizer", str(tokenizer), "--output-dir", str(out), *extra
    )


def run_export(model_dir: Path, out: Path, *extra: str) -> dict:
    return run_measured("-m", "posttrain.export", str(model_dir), "--output", str(out), *extra)


def against_model(label: str, run: dict, model_bytes: int) -> dict:
    """Add the peak RSS as a multiple of the converted model's size, and print the run's figures."""
    run["peak_rss_over_model"] = round(run["peak_rss_bytes"] / model_bytes, 2)
    print(
        f"{label}: {run['wall_s']} s, peak RSS {run['peak_rss_bytes'] / 1e9:.2f} GB = {run['peak_rss_over_model']}x "
        f"the converted model ({model_bytes / 1e9:.2f} GB); " + " ".join(run["stdout"]),
        flush=True,
    )
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="where the ~11 GB checkpoint goes (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and converted model")
    parser.add_argument("--no-verify", action="store_true", help="skip the second, --verify run")
    parser.add_argument("--tokenizer", default="qwen3", help="convert-checkpoint's --tokenizer (default: qwen3)")
    parser.add_argument("--write-checkpoint", metavar="PATH", help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args()
    if args.write_checkpoint:
        return write_checkpoint(Path(args.write_checkpoint))

    work = Path(tempfile.mkdtemp(prefix="convert_bench_", dir=args.workdir))
    try:
        ckpt, out = work / "ckpt_160000.pt", work / "hf_model"
        tokenizer = args.tokenizer
        source = run_measured(__file__, "--write-checkpoint", str(ckpt))
        source["bytes"] = ckpt.stat().st_size
        print(
            f"wrote synthetic checkpoint: {source['bytes'] / 1e9:.2f} GB in {source['wall_s']} s, "
            f"peak RSS {source['peak_rss_bytes'] / 1e9:.2f} GB",
            flush=True,
        )

        drop_from_page_cache(ckpt)
        convert = run_convert(ckpt, tokenizer, out)
        model_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        against_model("convert", convert, model_bytes)
        result = {
            "model_args": fixtures.QWEN3_1_8B_ARGS,
            "tokenizer": tokenizer,
            "checkpoint_bytes": source["bytes"],
            "checkpoint_write": {"wall_s": source["wall_s"], "peak_rss_bytes": source["peak_rss_bytes"]},
            "converted_model_bytes": model_bytes,
            "convert": convert,
            "targets": {"wall_s": 180, "peak_rss_over_model": 2.0, "stretch_peak_rss_over_model": 1.0},
            "passed": convert["wall_s"] < 180 and convert["peak_rss_over_model"] < 2.0,
            "machine": {"cpus": os.cpu_count(), "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
            "note": "checkpoint evicted from the page cache before the first conversion (read from disk); "
            "the --verify run reads it warm; the converted model's shards likewise before the first export",
        }
        if not args.no_verify:
            verify = run_convert(ckpt, tokenizer, out, "--verify", "--overwrite")
            result["convert_verify"] = against_model("convert --verify", verify, model_bytes)

        ckpt.unlink()  # the way back needs only the converted model: at most ~15 GB on disk at any time
        exported = work / "ckpt_exported.pt"
        for shard in out.glob("*.safetensors"):
            drop_from_page_cache(shard)
        back = against_model("export", run_export(out, exported), model_bytes)
        back["bytes"] = exported.stat().st_size
        result["export"] = back
        result["passed"] = result["passed"] and back["wall_s"] < 180 and back["peak_rss_over_model"] < 2.0
        if not args.no_verify:
            verify = run_export(out, exported, "--verify", "--overwrite")
            result["export_verify"] = against_model("export --verify", verify, model_bytes)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

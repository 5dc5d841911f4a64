#!/usr/bin/env python
"""How fast prepare_sft.py turns an Alpaca-sized dataset into SFT data, token statistics included.

52,000 synthetic rows in the tatsu-lab/alpaca schema (instruction, input on about a
third of rows, output, text; lengths near Alpaca's) go through
`data_scripts/prepare_sft.py --tokenizer` as a subprocess, timed end to end. The tokenizer is
the built-in Qwen3 one by default (`qwen3`: loading it from its cache is timed too), or any
tokenizer directory (`--tokenizer runs/converted`), or the tiny fixture one (`--tokenizer fixture`). Prints rows/s; writes benchmarks/results/prepare_sft_throughput.json.

    python benchmarks/prepare_sft_throughput.py [--rows 52000] [--num-proc 2] [--tokenizer qwen3|fixture|DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import alpaca_rows

from posttrain.demo.fixtures import save_tokenizer, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=52_000)
    p.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    p.add_argument("--tokenizer", default="qwen3", help="qwen3 (built in), fixture (tiny), or a directory")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "prepare_sft_throughput.json"))
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_jsonl(tmp / "alpaca.jsonl", alpaca_rows(args.rows))
        if args.tokenizer == "fixture":
            tokenizer = save_tokenizer(tmp / "tokenizer")
        else:
            tokenizer = args.tokenizer  # qwen3 (built in) or a directory
        cmd = [
            sys.executable,
            str(REPO / "data_scripts" / "prepare_sft.py"),
            "--dataset",
            "alpaca",
            "--data-files",
            str(data),
            "--output-dir",
            str(tmp / "out"),
            "--tokenizer",
            str(tokenizer),
            "--num-proc",
            str(args.num_proc),
        ]
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        load = os.getloadavg()[0]  # other work on the machine slows the run down ...
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # ... not the CPU time the run itself needs
        cpu_seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        meta = json.loads((tmp / "out" / "meta.json").read_text())

    result = {
        "rows": args.rows,
        "tokenizer": args.tokenizer,
        "seconds": round(seconds, 2),
        "rows_per_s": round(args.rows / seconds),
        "cpu_seconds_all_processes": round(cpu_seconds, 2),
        "target_seconds": 60,
        "num_proc": args.num_proc,
        "cpus": os.cpu_count(),
        "load_average_1min_at_start": round(load, 2),
        "machine": platform.processor() or platform.machine(),
        "counts": meta["counts"],
        "train_tokens": meta["tokens"]["train"]["sequence"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"prepare_sft.py: {args.rows} rows in {seconds:.1f} s = {result['rows_per_s']} rows/s (target < 60 s); "
        f"{cpu_seconds:.1f} CPU-seconds over {args.num_proc} processes; load average {load:.1f} at the start"
    )


if __name__ == "__main__":
    main()

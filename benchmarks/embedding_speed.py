"""Embedding extraction speed and memory of both ERes2NetV2 variants on real speech.

For each variant and recording length, a fresh process builds the model (random weights: speed
does not depend on their values), embeds real LibriSpeech speech of that length through the
whole front end (fbank, CMN, model) a few times after one warm-up, and reports:
- the real-time factor (compute seconds per second of audio; lower is faster),
- the peak resident memory of the process and how much extraction added to it.

    python benchmarks/embedding_speed.py [--threads N] [--repeats R] [--seconds 3 30]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SPEECH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "librispeech-train-clean-100-251spk"
VARIANTS = ("eres2netv2", "eres2netv2_w24s4ep4")


def rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux)."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def real_speech(seconds: float):
    import numpy as np
    import soundfile as sf

    pieces, total = [], 0
    for path in sorted(SPEECH.glob("*.flac")):
        data, rate = sf.read(path, dtype="float32")
        pieces.append(data)
        total += len(data)
        if total >= seconds * rate:
            break
    return np.concatenate(pieces)[: int(seconds * 16000)]


def measure(variant: str, seconds: float, threads: int, repeats: int) -> dict:
    import torch

    from spkft.core.audio import decode_pcm
    from spkft.core.embedding import Embedder
    from spkft.core.model import build_model

    torch.set_num_threads(threads)
    samples = real_speech(seconds)
    pcm = samples.astype("<f4").tobytes()
    embedder = Embedder(build_model(variant))
    before = rss_mib()
    embedder.embed_waveform(decode_pcm(pcm, 16000, "float32"))  # warm-up
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        embedder.embed_waveform(decode_pcm(pcm, 16000, "float32"))
        timings.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    best = min(timings)
    return {
        "variant": variant,
        "seconds": seconds,
        "threads": torch.get_num_threads(),
        "best_s": best,
        "median_s": sorted(timings)[len(timings) // 2],
        "rtf": best / seconds,
        "peak_rss_mib": peak,
        "extraction_mib": peak - before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--seconds", type=float, nargs="+", default=[3.0, 30.0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], float(args.child[1]), args.threads, args.repeats)))
        return
    if not SPEECH.is_dir():
        sys.exit(f"real speech not found at {SPEECH}; this benchmark needs ../shared/data beside the checkout")
    print(f"embedding extraction, {args.threads} torch thread(s), best of {args.repeats} after a warm-up")
    print(f"{'variant':<22}{'audio s':>8}{'best s':>9}{'median s':>10}{'RTF':>8}{'peak RSS MiB':>14}{'added MiB':>11}")
    for variant in args.variants:
        for seconds in args.seconds:
            # One process per case so that each peak-memory reading is its own.
            out = subprocess.run(
                [sys.executable, __file__, "--child", variant, str(seconds),
                 "--threads", str(args.threads), "--repeats", str(args.repeats)],
                capture_output=True, text=True, check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{r['variant']:<22}{r['seconds']:>8.0f}{r['best_s']:>9.3f}{r['median_s']:>10.3f}"
                  f"{r['rtf']:>8.3f}{r['peak_rss_mib']:>14.0f}{r['extraction_mib']:>11.0f}")


if __name__ == "__main__":
    main()

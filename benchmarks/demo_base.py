"""The bundled base, measured and made: EER on the speakers ``configs/demo-base.yaml`` held out for
testing, per corpus, against other checkpoints on the same trials; ``--bundle`` writes the file.

A run of ``spkft train --config configs/demo-base.yaml`` holds out speakers of both pooled corpora
(LibriSpeech and speechocean762) for testing: it never trains on them and never picks an epoch on
them. This script remakes that split from the run's config, measures every checkpoint given on
each corpus's test speakers (every pair a trial; LibriSpeech's single recordings cut into 2 s
segments), and prints one table. With ``--bundle`` it writes the run's best checkpoint to
``core/models/spkft_demo_base.ckpt`` without its training-only state, with the held-out figures,
the data's provenance and licences recorded in it.

    python benchmarks/demo_base.py --run runs/demo-base [--compare OLD.ckpt ...] [--bundle]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from domain_adaptation import ROOT, base_split, embed_all

BUNDLED = ROOT / "core" / "models" / "spkft_demo_base.ckpt"
PROVENANCE = {
    "made_by": "spkft train --config configs/demo-base.yaml",
    "data": {
        "librispeech": "LibriSpeech train-clean-100 (openslr.org/12), one recording of each of 251 speakers, as "
                       "collected in the Resemblyzer repository (audio_data/librispeech_train-clean-100); "
                       "CC BY 4.0, by Vassil Panayotov, Guoguo Chen, Daniel Povey and Sanjeev Khudanpur",
        "speechocean762": "speechocean762 (openslr.org/101; Junbo Zhang et al., Interspeech 2021), the 128 adult "
                          "speakers (19 or older), 10 sentences each, as collected in the jimbozhang/speechocean762 "
                          "repository; released free for commercial and non-commercial use",
    },
    "licence": "Apache-2.0 (the weights), with the attributions above",
}


def measure(checkpoint, tests) -> dict[str, dict[str, float]]:
    from spkft.core.checkpoint import load_model
    from spkft.core.embedding import Embedder

    embedder = Embedder(load_model(checkpoint).model)
    figures = {}
    for name, test in tests.items():
        eer, _, min_dcf = test.measure(embed_all(embedder, test.recordings), 0, 0)
        figures[name] = {"eer": eer, "min_dcf": min_dcf, "speakers": len({r.speaker for r in test.recordings}),
                         "recordings": len(test.recordings), "trials": len(test.upper[0])}
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="the run folder of configs/demo-base.yaml")
    parser.add_argument("--compare", type=Path, nargs="*", default=[], help="other checkpoints to measure alike")
    parser.add_argument("--bundle", action="store_true", help=f"write the run's best checkpoint to {BUNDLED}")
    args = parser.parse_args()
    best = args.run / "best.ckpt"
    _, _, tests = base_split(str(best))
    for name, test in tests.items():
        print(f"{name}: {test.describe()}")
    rows = {str(path): measure(path, tests) for path in [best, *args.compare]}
    names = list(tests)
    print("| checkpoint | " + " | ".join(f"{n} EER | {n} minDCF" for n in names) + " |")
    print("| --- | " + " | ".join("--- | ---" for _ in names) + " |")
    for path, figures in rows.items():
        print(f"| {path} | " + " | ".join(f"{figures[n]['eer']:.2%} | {figures[n]['min_dcf']:.3f}" for n in names) + " |")
    if args.bundle:
        from spkft.core.checkpoint import read_checkpoint
        from spkft.core.train.trainer import RESUME_ONLY_KEYS

        checkpoint = {k: v for k, v in read_checkpoint(best).items() if k not in RESUME_ONLY_KEYS}
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        checkpoint["provenance"] = PROVENANCE | {"commit": commit.stdout.strip()}
        checkpoint["test_evaluation"] = rows[str(best)]
        torch.save(checkpoint, BUNDLED)
        print(f"wrote {BUNDLED} ({BUNDLED.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

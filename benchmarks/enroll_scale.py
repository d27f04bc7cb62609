"""The enrollment store at scale, SQLite and PostgreSQL in one run: enroll throughput, open time,
Identify latency and resident memory at 10k, 100k and 1M speakers.

For each backend and size, the store is filled in bulk with random speakers (192-dimensional
float64 sums, as w24s4ep4's embeddings), then opened in a fresh subprocess that, like
``spkft serve``, keeps torch at one thread. It reports:
- open: seconds from ``EnrollmentStore(...)`` to a searchable index;
- Identify p50/p99: ``store.identify(query, top_k=5)`` for 300 random queries;
- memory: the process's resident memory after opening, less what it held before (the index
  and everything that came with it);
- enroll/s at 1 and 16 client threads (at the smallest size): ``store.enroll`` of one embedding
  each, committed before it returns, for a few seconds.

Targets (issue "Serving that scales out"): open 1M speakers in at most 10 s; Identify top-5 over
1M with p50 at most 30 ms on 2 cores. ``--plda`` searches by a PLDA's log-likelihood ratio instead
of the cosine, as a served model that carries one does (a PLDA with 128 LDA dimensions fitted on
random speakers; the same targets).

    python benchmarks/enroll_scale.py [--sizes 10000,100000,1000000] [--backends sqlite,postgresql]
                                      [--plda] [--postgres URL]

Without ``--postgres`` (or ``SPKFT_BENCH_POSTGRES``) it starts a throwaway cluster with
``.ci/postgres`` (PostgreSQL's server binaries must be installed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DIM = 192
MODEL = "sha256:benchmark"
BLOCK = 50_000
QUERIES = 300
ENROLL_SECONDS = 5.0

OPEN_AND_SEARCH = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import numpy as np
    import torch
    torch.set_num_threads(1)
    from spkft.core.enrollment import EnrollmentStore

    def resident():
        status = Path("/proc/self/status").read_text()
        return int(next(l for l in status.splitlines() if l.startswith("VmRSS")).split()[1]) << 10

    location, model, dim, queries = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    plda = None
    if len(sys.argv) > 5:
        from spkft.core.plda import Plda
        plda = Plda.from_dict(torch.load(sys.argv[5], weights_only=True))
    if not location.startswith("postgresql://"):
        location = Path(location)
    before = resident()
    start = time.perf_counter()
    store = EnrollmentStore(location, model, dim, plda)
    opened = time.perf_counter() - start
    memory = resident() - before
    rng = np.random.default_rng(1)
    latencies = []
    for query in rng.standard_normal((queries, dim)).astype(np.float32):
        start = time.perf_counter()
        store.identify(query, top_k=5)
        latencies.append(time.perf_counter() - start)
    store.close()
    print(json.dumps({"speakers": len(store), "open_s": opened, "memory_bytes": memory,
                      "p50_ms": 1000 * float(np.percentile(latencies, 50)),
                      "p99_ms": 1000 * float(np.percentile(latencies, 99))}))
""")


def fill(location, speakers: int) -> None:
    """A store of ``speakers`` random speakers, written in bulk."""
    from spkft.core.enrollment import StoredSpeakers, open_backend

    rng = np.random.default_rng(0)

    def blocks():
        for start in range(0, speakers, BLOCK):
            n = min(BLOCK, speakers - start)
            yield StoredSpeakers([f"speaker-{start + i:07d}" for i in range(n)], rng.standard_normal((n, DIM)),
                                 rng.integers(1, 10, n))

    backend = open_backend(location)
    try:
        backend.claim(MODEL, DIM)
        backend.write_blocks(blocks())
    finally:
        backend.close()


def synthetic_plda(path: Path) -> Path:
    """A PLDA (128 LDA dimensions) fitted on random Gaussian speakers, saved as a checkpoint entry."""
    import torch

    from spkft.core.plda import fit_plda

    rng = np.random.default_rng(2)
    speakers, per_speaker = 400, 6
    centres = rng.standard_normal((speakers, DIM))
    x = np.repeat(centres, per_speaker, axis=0) + 0.5 * rng.standard_normal((speakers * per_speaker, DIM))
    torch.save(fit_plda(x, [i // per_speaker for i in range(len(x))]).to_dict(), path)
    return path


def open_and_search(location, plda: Path | None = None) -> dict:
    extra = [] if plda is None else [str(plda)]
    result = subprocess.run([sys.executable, "-c", OPEN_AND_SEARCH, str(location), MODEL, str(DIM), str(QUERIES),
                             *extra], capture_output=True, text=True, cwd=ROOT, check=False)
    if result.returncode != 0:
        raise SystemExit(f"opening {location} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def enroll_rate(location, clients: int) -> float:
    """Enrollments per second from ``clients`` threads, each enrolling one embedding per call."""
    from spkft.core.enrollment import EnrollmentStore

    store = EnrollmentStore(location, MODEL, DIM)
    done = [0] * clients
    stop = threading.Event()

    def client(i: int) -> None:
        rng = np.random.default_rng(100 + i)
        while not stop.is_set():
            store.enroll(f"client-{i}-{done[i] % 50}", rng.standard_normal(DIM))
            done[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(ENROLL_SECONDS)
    stop.set()
    for thread in threads:
        thread.join()
    rate = sum(done) / (time.perf_counter() - start)
    store.close()
    return rate


class Postgres:
    """A database per store on a server: the one given, or a throwaway cluster."""

    def __init__(self, url: str | None) -> None:
        self.cluster = None
        if url is None:
            self.cluster = tempfile.mkdtemp(prefix="spkft-bench-pg.")
            os.chmod(self.cluster, 0o755)
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            subprocess.run([ROOT / ".ci" / "postgres", "init", self.cluster, str(port)], check=True)
            url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        self.url = url
        self.made: list[str] = []  # databases to drop at the end

    def database(self) -> str:
        import psycopg

        name = f"spkft_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        self.made.append(name)
        return self.url.rsplit("/", 1)[0] + "/" + name

    def close(self) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            for name in self.made:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        if self.cluster is not None:
            subprocess.run([ROOT / ".ci" / "postgres", "stop", self.cluster], check=False)
            shutil.rmtree(self.cluster, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="Store sizes, in speakers, comma-separated.")
    parser.add_argument("--postgres", default=os.environ.get("SPKFT_BENCH_POSTGRES"),
                        help="A PostgreSQL server URL to create databases on [default: a throwaway cluster].")
    parser.add_argument("--backends", default="sqlite,postgresql", help="Stores to measure, comma-separated.")
    parser.add_argument("--plda", action="store_true", help="Identify by a PLDA's LLR instead of the cosine.")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    backends = [name for name in args.backends.split(",") if name]
    if not backends or any(name not in ("sqlite", "postgresql") for name in backends):
        parser.error("--backends: choose among sqlite, postgresql")
    postgres = Postgres(args.postgres) if "postgresql" in backends else None
    folder = Path(tempfile.mkdtemp(prefix="spkft-bench-stores."))
    plda = synthetic_plda(folder / "plda.pt") if args.plda else None
    rows = []
    try:
        for backend in backends:
            for size in sizes:
                location = folder / f"{size}.sqlite" if backend == "sqlite" else postgres.database()
                start = time.perf_counter()
                fill(location, size)
                filled = time.perf_counter() - start
                measured = open_and_search(location, plda)
                assert measured["speakers"] == size, measured
                row = {"backend": backend, "speakers": size, "fill_s": filled, **measured}
                if size == sizes[0]:
                    row["enroll_per_s"] = {clients: enroll_rate(location, clients) for clients in (1, 16)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if backend == "sqlite":
                    for path in folder.glob(f"{size}.sqlite*"):
                        path.unlink()
    finally:
        if postgres is not None:
            postgres.close()
        shutil.rmtree(folder, ignore_errors=True)

    scoring = "PLDA log-likelihood ratios (128 dims)" if args.plda else "cosine"
    print(f"\n{os.cpu_count()} cores; {DIM}-dimensional embeddings; Identify is top-5 by {scoring}\n")
    print("| store | speakers | open | Identify p50 | Identify p99 | memory | enroll/s, 1 client | enroll/s, 16 clients |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        rates = row.get("enroll_per_s")
        enroll = f"{rates[1]:.0f} | {rates[16]:.0f}" if rates else "– | –"
        print(f"| {row['backend']} | {row['speakers']:,} | {row['open_s']:.2f} s | {row['p50_ms']:.1f} ms | "
              f"{row['p99_ms']:.1f} ms | {row['memory_bytes'] / 2**20:.0f} MiB | {enroll} |")
    largest = [row for row in rows if row["speakers"] == max(sizes)]
    for row in largest:
        verdict = "meets" if row["open_s"] <= 10 and row["p50_ms"] <= 30 else "misses"
        print(f"{row['backend']} at {row['speakers']:,}: open {row['open_s']:.1f} s (target <= 10 s), "
              f"p50 {row['p50_ms']:.1f} ms (target <= 30 ms): {verdict} the targets")


if __name__ == "__main__":
    main()

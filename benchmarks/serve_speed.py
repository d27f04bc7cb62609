"""gRPC serving speed of ``spkft serve`` in int8 against bf16, fp32, onnxruntime and sherpa-onnx, on real speech,
and the verification error of each precision on held-out speakers.

Everything is measured in this one run and reported as ratios. For each model variant (random
weights, exported with ``export_onnx``, and its int8 twin calibrated by ``export_int8`` on 300
crops of LibriSpeech: speed does not depend on the values), recording length (real LibriSpeech
speech of different speakers, cropped) and client concurrency, these engines embed the same
16-bit WAV recordings, each called from ``concurrency`` client threads at once:
- ``spkft serve``: the real server (``python -m spkft.tui.cli serve`` in a subprocess on a free
  port, its defaults but ``--engine``, ``--precision`` (int8 here), ``--threads`` and
  ``--workers``), called over a real channel with ``Embed(Audio{content=<wav bytes>})`` through
  :class:`spkft.serve.client.SpeakerClient`;
- ``in-process``: ``OnnxEmbedder.embed`` in this process on the same bytes (decode, fbank, CMN,
  network) with the server's engine and precision and one shared model: the bare cost that
  serving adds to;
- ``openvino bf16`` and ``openvino fp32``: the same in-process embedder in OpenVINO's other
  precisions (those the server's is not);
- ``onnxruntime``: the same in-process embedder on onnxruntime in fp32, the reference runtime;
- ``sherpa-onnx``: its ``SpeakerEmbeddingExtractor`` (its own C++ fbank and onnxruntime) on the
  same ONNX file, after the same ``soundfile`` decode of the bytes.
The in-process engines run at most ``--in-process-calls`` calls at once (default 8; the client
threads beyond that wait their turn, and their wait counts in latency): every onnxruntime run
holds its own activations, so 32 calls of 10 s into eres2netv2_w24s4ep4 would take about 9 GB in
onnxruntime and as much again in sherpa-onnx, more than the 24 GB machine has, while 8 already
keep the cores busy. The server bounds its own inference memory the same way (``--workers``).
Every engine gets the same ``--threads`` cores: the in-process engines and sherpa-onnx get
``--threads`` threads; the server runs ``--workers`` inference calls at once, each with
``--threads / --workers`` threads, as ``spkft serve`` lays out its cores by default
(``--server-threads`` sets the threads per call instead). fbank (torch) runs with one torch thread in
each request thread, in this process as in ``spkft serve``.

The engines take turns (round-robin, the order rotating each round), so a change in the load of
a shared machine hits them alike; each turn sends ``--requests`` requests and starts with none in
flight, a second after the previous turn ended (so that its engine's spinning threads are idle). Throughput is requests / wall time of a turn; a ratio between engines is the median over
rounds of the ratio within a round, where both saw the same load (the ratio of their best rounds
is printed beside it). Latency percentiles pool every timed request of an engine (with fewer than
100, p99 is about the worst). An untimed warm-up comes first: each distinct recording once per
engine, and its embeddings give the agreement checks. Take the verdicts from an idle machine:
with other jobs on the cores, the ratios at concurrency 8 moved between 0.76x and 1.0x from one
quick run to the next, as the engines' different thread layouts won or lost the contended CPU.

Targets (PASS/FAIL):
- serving overhead at most 10%: the server's throughput at least 0.9x the in-process engine's,
  at every variant, length and concurrency;
- int8 against bf16, in-process both: at least 1.6x the throughput at concurrency 8 and at most
  0.6x the p50 latency at concurrency 1 (the target is set for eres2netv2_w24s4ep4 on 3 s;
  every case is printed);
- the server's throughput at concurrency 8 at least 3.5x sherpa-onnx's;
- verification error: the EER of int8 within 2 % (relative) of fp32's on held-out speakers.
  Random weights say nothing of that, so it is measured on ``spkft_demo_base``, a small
  ERes2NetV2 (m_channels 8) that spkft trained on LibriSpeech and speechocean762 speakers, on its
  run's own validation trials (30 held-out speakers): calibrated on 300 crops of its
  training recordings and searched for layers to keep in fp32, as ``spkft export --quantize int8``
  does by default, and forced through the export's check so that it can be measured whatever the
  result. (The random-weight twins above are fully quantized: their speed is that of int8 in every
  layer.) Every precision is measured there: int8,
  bf16 and fp32 in OpenVINO, fp32 in onnxruntime.
- agreement: the server returns the in-process embedding (cosine >= 0.99999); the served
  precision stays close to onnxruntime's fp32 (cosine >= 0.99999 in fp32, >= 0.9999 in bf16; in
  int8 the cosine is printed for scale, and the EER above is the verdict);
  and sherpa-onnx, reading nothing but the exported metadata, embeds each recording like spkft
  (cosine >= 0.99, and nearest to spkft's embedding of the same recording rather than another
  speaker's). Its fbank is not quite spkft's (mel bins up to 7600 Hz, not 8000; snip_edges false),
  hence not 0.99999; the mean cosine of different speakers' recordings is printed for scale
  (random weights tell speakers apart poorly).

    python benchmarks/serve_speed.py [--variants V ...] [--seconds 3 10] [--concurrency 1 8 32]
                                     [--requests 16] [--rounds 3] [--threads 2] [--workers 1]
                                     [--engine auto] [--precision int8] [--server-threads N]
                                     [--in-process-calls 8] [--clips 8] [--cache DIR]

It needs sherpa-onnx (``pip install -e '.[bench]'``) and ../shared/data beside the checkout, and
runs from the checkout's root (the demo base model's run names its data relative to it).
On the 2-core development machine a quick check of one variant, 3 s and concurrency 1 and 8 took
under a minute (2 rounds of 16 requests, model cached), plus the export on a first run (12 s for
eres2netv2, 26 s for eres2netv2_w24s4ep4; ``--cache DIR`` keeps the models for the next run):

    python benchmarks/serve_speed.py --variants eres2netv2 --seconds 3 --concurrency 1 8 --rounds 2

The full default run (both variants, 3 and 10 s, concurrency 1, 8 and 32, 3 rounds) took 32
minutes there before the int8 and the two OpenVINO baselines joined; onnxruntime and sherpa-onnx
on 10 s recordings of eres2netv2_w24s4ep4 are most of it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from spkft.core.onnx_model import ENGINES as ENGINE_CHOICES
from spkft.core.onnx_model import PRECISIONS as PRECISION_CHOICES

SPEECH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "librispeech-train-clean-100-251spk"
VARIANTS = ("eres2netv2", "eres2netv2_w24s4ep4")
SEED = 0
SERVER, IN_PROCESS, ONNXRUNTIME, SHERPA = "spkft serve", "in-process", "onnxruntime", "sherpa-onnx"
BF16, FP32 = "openvino bf16", "openvino fp32"
BASELINE_PRECISIONS = {BF16: "bf16", FP32: "fp32"}

TARGET_OVERHEAD = 0.9  # server / in-process onnxruntime throughput, at every concurrency
TARGET_VS_SHERPA = 3.5  # server / sherpa-onnx throughput at SHERPA_CONCURRENCY
SHERPA_CONCURRENCY = 8
TARGET_VS_BF16 = 1.6  # in-process throughput / in-process bf16's, at SHERPA_CONCURRENCY
TARGET_LATENCY_VS_BF16 = 0.6  # in-process p50 latency / in-process bf16's, one client at a time
TARGET_EER_INCREASE = 0.02  # int8 EER over fp32's, relative, on the demo base model's held-out speakers
DEMO_BASE = "spkft_demo_base"
# Between turns: onnxruntime's threads spin-wait for more work after a run, and would take the
# cores from the next engine's first requests (measured: the server at one client lost 10% to
# sherpa-onnx's spinning when it followed it without a pause, and nothing with one).
PAUSE_SECONDS = 1.0
MIN_SERVER_COSINE = 0.99999  # the server must return what the model computes in-process
MIN_PRECISION_COSINE = {"fp32": 0.99999, "bf16": 0.9999, "int8": -1.0}  # served precision vs onnxruntime's fp32
MIN_SHERPA_COSINE = 0.99  # a different fbank (see the docstring), same network
# Milliseconds per 3 s request with 2 threads, one at a time, measured before on this project's 2-core CPU.
REFERENCE_MS = {("eres2netv2", ONNXRUNTIME): 220, ("eres2netv2", SHERPA): 229,
                ("eres2netv2_w24s4ep4", ONNXRUNTIME): 420, ("eres2netv2_w24s4ep4", SHERPA): 503}


def wav_bytes(samples: np.ndarray) -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, samples, 16000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def speech_clips(seconds: float, count: int) -> list[bytes]:
    """WAV bytes of the first ``seconds`` of ``count`` recordings long enough, one per speaker."""
    import soundfile as sf

    clips = []
    for path in sorted(SPEECH.glob("*.flac")):
        if sf.info(path).duration >= seconds:
            data, _ = sf.read(path, dtype="int16", frames=int(seconds * 16000))
            clips.append(wav_bytes(data))
        if len(clips) == count:
            return clips
    sys.exit(f"only {len(clips)} recordings in {SPEECH} last {seconds:g} s; ask for fewer --clips or shorter --seconds")


def exported_model(variant: str, directory: Path, int8_data) -> Path:
    """A random-weight ONNX export of ``variant`` in ``directory`` with its int8 twin, made unless already there."""
    import torch

    from spkft.core.export import export_int8, export_onnx
    from spkft.core.model import build_model
    from spkft.core.onnx_model import int8_twin
    from spkft.core.quantize import Int8Settings

    output = directory / f"{variant}-random-seed{SEED}.onnx"
    if output.is_file():  # export_onnx renames a file into place only once it has checked it
        print(f"{variant}: reusing {output}", file=sys.stderr, flush=True)
    else:
        print(f"{variant}: exporting random weights to {output} (1-2 minutes)", file=sys.stderr, flush=True)
        started = time.monotonic()
        torch.manual_seed(SEED)
        checkpoint = directory / f"{variant}-random-seed{SEED}.ckpt"
        torch.save(build_model(variant).state_dict(), checkpoint)
        try:
            export_onnx(checkpoint, output, variant=variant)
        finally:
            checkpoint.unlink()
        print(f"{variant}: exported in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    if not int8_twin(output).is_file():
        # Random weights verify nothing: the twin is fully quantized (no search for layers to keep in fp32),
        # forced through the EER check and served by name.
        started = time.monotonic()
        export_int8(output, int8_data, Int8Settings(max_fp32_layers=0, force=True),
                    note=lambda line: print(f"{variant}: {line}", file=sys.stderr, flush=True))
        print(f"{variant}: int8 twin in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return output


def precision_eers(directory: Path, int8_data) -> dict:
    """The demo base model's EER and minDCF on its run's validation trials in each precision and engine."""
    from spkft.core.evaluate import evaluate
    from spkft.core.export import export_int8, export_onnx
    from spkft.core.onnx_model import OnnxEmbedder
    from spkft.core.quantize import Int8Settings

    model = directory / f"{DEMO_BASE}.onnx"
    print(f"{DEMO_BASE}: exporting, calibrating int8 and measuring each precision", file=sys.stderr, flush=True)
    export_onnx(DEMO_BASE, model)
    quantized = export_int8(model, int8_data, Int8Settings(force=True))
    print(f"{DEMO_BASE}: int8 keeps {len(quantized.fp32_layers)} layer(s) in fp32: "
          f"{', '.join(quantized.fp32_layers) or 'none'}", file=sys.stderr, flush=True)
    found = {"int8": quantized.int8, "fp32": quantized.fp32}
    for name, engine, precision in (("bf16", "openvino", "bf16"), ("onnxruntime fp32", "onnxruntime", "fp32")):
        embedder = OnnxEmbedder.from_file(model, engine=engine, precision=precision)
        found[name] = evaluate(embedder, int8_data.recordings, int8_data.trials).metrics
    return found


def server_threads(args) -> int:
    """onnxruntime threads per server inference call: the engines' cores shared among the workers."""
    return args.server_threads or max(1, args.threads // args.workers)


@contextlib.contextmanager
def spkft_serve(args, model: Path, workdir: Path) -> Iterator[str]:
    """``spkft serve`` on a free port of 127.0.0.1 in a subprocess; yields its address once it serves."""
    log_path = workdir / "server.log"
    command = [sys.executable, "-m", "spkft.tui.cli", "serve", "--model", str(model), "--port", "0",
               "--enroll-db", str(workdir / "enrollments.sqlite"), "--threads", str(server_threads(args)),
               "--workers", str(args.workers), "--engine", args.engine, "--precision", args.precision]
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        # It prints its address once the model is loaded, or exits (end of file) if it cannot start.
        announced = re.search(r"listening on (\S+)", server.stdout.readline())
        if announced is None:
            sys.exit(f"spkft serve did not start (exit {server.wait()}); its log:\n{log_path.read_text()}")
        yield announced.group(1)
    finally:
        server.send_signal(signal.SIGTERM)  # it drains and exits
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


class SherpaEmbedder:
    """sherpa-onnx's speaker embedding extractor: its own fbank and CMN, from the model's metadata alone."""

    def __init__(self, model: Path, threads: int) -> None:
        import sherpa_onnx

        config = sherpa_onnx.SpeakerEmbeddingExtractorConfig(model=str(model), num_threads=threads)
        if not config.validate():
            sys.exit(f"sherpa-onnx refuses {model}: {config}")
        self.extractor = sherpa_onnx.SpeakerEmbeddingExtractor(config)

    def __call__(self, wav: bytes) -> np.ndarray:
        import soundfile as sf

        samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
        stream = self.extractor.create_stream()
        stream.accept_waveform(rate, samples)
        stream.input_finished()
        return np.asarray(self.extractor.compute(stream), dtype=np.float32)


def capped(call: Callable[[bytes], np.ndarray], limit: int) -> Callable[[bytes], np.ndarray]:
    """``call`` with at most ``limit`` calls running at once; the other client threads wait their turn."""
    slots = threading.BoundedSemaphore(limit)

    def run(wav: bytes) -> np.ndarray:
        with slots:
            return call(wav)

    return run


def send(call: Callable[[bytes], np.ndarray], clips: list[bytes], concurrency: int, requests: int):
    """``requests`` calls from ``concurrency`` threads, request i on clip i mod len(clips).

    Returns the wall seconds from the first call to the last answer, each request's latency and
    each request's embedding.
    """
    tickets = iter(range(requests))
    lock = threading.Lock()
    latencies, embeddings, errors = [0.0] * requests, [None] * requests, []
    gate = threading.Barrier(concurrency + 1)

    def client() -> None:
        gate.wait()
        while True:
            with lock:
                i = next(tickets, None)
            if i is None or errors:
                return
            start = time.perf_counter()
            try:
                embeddings[i] = call(clips[i % len(clips)])
            except Exception as exc:  # handed to the main thread below
                errors.append(exc)
                return
            latencies[i] = time.perf_counter() - start

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    gate.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return wall, latencies, embeddings


def agreement_of(variant: str, seconds: float, engine: str, precision: str, warm: dict[str, list[np.ndarray]]) -> dict:
    """How the engines' embeddings of the same distinct recordings compare with in-process spkft's."""
    from spkft.core.embedding import l2_normalise

    spkft, sherpa = (l2_normalise(np.stack(warm[e])) for e in (ONNXRUNTIME, SHERPA))
    served, bare = (l2_normalise(np.stack(warm[e])) for e in (SERVER, IN_PROCESS))
    across = sherpa @ spkft.T  # sherpa-onnx's embedding of recording i against spkft's of recording j
    return {"variant": variant, "seconds": seconds, "recordings": len(spkft), "engine": engine, "precision": precision,
            "server": float(np.sum(served * bare, axis=1).min()),
            "precision_cosine": float(np.sum(bare * spkft, axis=1).min()),
            "sherpa": float(np.diag(across).min()),
            "nearest": int(np.sum(across.argmax(axis=1) == np.arange(len(spkft)))),
            "speakers": float(np.mean((spkft @ spkft.T)[~np.eye(len(spkft), dtype=bool)]))}


def measure_variant(args, variant: str, model: Path, clips: dict[float, list[bytes]], workdir: Path):
    """Speed cases and agreement of one variant; see the module docstring."""
    from spkft.core.onnx_model import OnnxEmbedder
    from spkft.serve.client import SpeakerClient

    embedder = OnnxEmbedder.from_file(model, threads=args.threads, engine=args.engine, precision=args.precision)
    reference = OnnxEmbedder.from_file(model, threads=args.threads, engine="onnxruntime")
    sherpa = SherpaEmbedder(model, args.threads)
    baselines = {name: OnnxEmbedder.from_file(model, threads=args.threads, engine="openvino", precision=precision)
                 for name, precision in BASELINE_PRECISIONS.items() if precision != embedder.engine.precision}
    engines = (SERVER, IN_PROCESS, *baselines, ONNXRUNTIME, SHERPA)
    cases, agreement = [], []
    with spkft_serve(args, model, workdir) as address, SpeakerClient(address, timeout_seconds=600) as client:
        served = client.info()
        if (served.engine, served.precision) != (embedder.engine.name, embedder.engine.precision):
            sys.exit(f"the server runs {served.engine} in {served.precision}, but in-process it is "
                     f"{embedder.engine.name} in {embedder.engine.precision}: the overhead would not be comparable")
        calls = {SERVER: lambda wav: np.asarray(client.embed(wav).embedding, dtype=np.float32),
                 IN_PROCESS: capped(lambda wav: embedder.embed(wav).vector, args.in_process_calls),
                 ONNXRUNTIME: capped(lambda wav: reference.embed(wav).vector, args.in_process_calls),
                 SHERPA: capped(sherpa, args.in_process_calls)}
        calls |= {name: capped(lambda wav, model=baseline: model.embed(wav).vector, args.in_process_calls)
                  for name, baseline in baselines.items()}
        for seconds, wavs in clips.items():
            # Warm-up: each distinct recording once per engine, concurrently, which also warms the thread pools.
            warm = {e: send(calls[e], wavs, min(len(wavs), max(args.concurrency)), len(wavs))[2] for e in engines}
            agreement.append(agreement_of(variant, seconds, embedder.engine.name, embedder.engine.precision, warm))
            for concurrency in args.concurrency:
                requests = max(args.requests, concurrency)
                timed = {e: {"walls": [], "latencies": []} for e in engines}
                for round_ in range(args.rounds):
                    order = engines[round_ % len(engines):] + engines[: round_ % len(engines)]
                    for engine in order:
                        time.sleep(PAUSE_SECONDS)
                        wall, latencies, _ = send(calls[engine], wavs, concurrency, requests)
                        timed[engine]["walls"].append(wall)
                        timed[engine]["latencies"] += latencies
                    print(f"{variant} {seconds:g} s, concurrency {concurrency}, round {round_ + 1}/{args.rounds}: "
                          + ", ".join(f"{e} {requests / timed[e]['walls'][-1]:.2f} req/s" for e in engines),
                          file=sys.stderr, flush=True)
                for engine in engines:
                    cases.append({"variant": variant, "seconds": seconds, "concurrency": concurrency,
                                  "engine": engine, "requests": requests, **timed[engine]})
    return cases, agreement


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def paired(case: dict, baseline: dict) -> float:
    """Median over rounds of the throughput ratio within a round: neighbouring turns saw the same load."""
    return statistics.median(c / b for c, b in zip(case["rates"], baseline["rates"]))


def paired_or_none(case: dict, key: tuple, engine: str, by_key: dict) -> float | None:
    baseline = by_key.get((*key, engine))
    return None if baseline is None else paired(case, baseline)


def shown(ratio: float | None, width: int) -> str:
    return f"{'-':>{width}}" if ratio is None else f"{ratio:>{width}.2f}"


def p50(case: dict) -> float:
    return float(np.percentile(case["latencies"], 50))


def report_eers(eers: dict) -> None:
    """The demo base model's verification figures in each precision, and the int8 verdict."""
    from spkft.core.quantize import eer_increase, relative

    fp32 = eers["fp32"]
    trials = fp32.target_trials + fp32.nontarget_trials
    print(f"\n{DEMO_BASE} on its run's validation trials ({trials}, 30 held-out speakers of LibriSpeech and "
          "speechocean762):")
    print(f"{'precision':<18}{'EER %':>8}{'vs fp32':>20}{'minDCF':>9}{'EER threshold':>15}")
    for name, metrics in eers.items():
        print(f"{name:<18}{100 * metrics.eer:>8.2f}{relative(eer_increase(fp32.eer, metrics.eer)):>20}"
              f"{metrics.min_dcf:>9.4f}{metrics.eer_threshold:>15.4f}")
    increase = eer_increase(fp32.eer, eers["int8"].eer)
    print(f"{verdict(increase <= TARGET_EER_INCREASE)}  EER, {DEMO_BASE}: int8 {100 * eers['int8'].eer:.2f} % against "
          f"fp32 {100 * fp32.eer:.2f} %, {relative(increase)} (target <= +{100 * TARGET_EER_INCREASE:g} % relative)")


def report(args, cases: list[dict], agreement: list[dict], eers: dict) -> None:
    by_key = {(c["variant"], c["seconds"], c["concurrency"], c["engine"]): c for c in cases}
    for case in cases:
        case["rates"] = [case["requests"] / wall for wall in case["walls"]]
    threads_per_call = server_threads(args)
    engine_name = ", ".join(sorted({f"{a['engine']} in {a['precision']}" for a in agreement}))
    print(f"\nEmbed throughput and latency: {args.threads} thread(s) in-process and in sherpa-onnx, spkft serve "
          f"--engine {args.engine} --precision {args.precision} --threads {threads_per_call} --workers {args.workers} "
          f"({engine_name}); in-process engines at most {args.in_process_calls} call(s) at once; "
          f"{args.rounds} round(s) after a warm-up; 'vs bf16', 'vs ort' and 'vs sherpa' are the medians of "
          f"the rounds' ratios")
    print(f"{'variant':<22}{'audio s':>8}{'conc':>6}  {'engine':<15}{'requests':>9}{'best/s':>8}{'median/s':>10}"
          f"{'p50 ms':>9}{'p99 ms':>9}{'vs bf16':>8}{'vs ort':>8}{'vs sherpa':>10}")
    for case in cases:
        key = (case["variant"], case["seconds"], case["concurrency"])
        low, high = np.percentile(case["latencies"], [50, 99]) * 1000
        print(f"{case['variant']:<22}{case['seconds']:>8g}{case['concurrency']:>6}  {case['engine']:<15}"
              f"{case['requests']:>9}{max(case['rates']):>8.2f}{statistics.median(case['rates']):>10.2f}"
              f"{low:>9.0f}{high:>9.0f}{shown(paired_or_none(case, key, BF16, by_key), 8)}"
              f"{shown(paired_or_none(case, key, ONNXRUNTIME, by_key), 8)}"
              f"{shown(paired_or_none(case, key, SHERPA, by_key), 10)}")
    if args.threads == 2 and 3.0 in args.seconds and 1 in args.concurrency:
        scale = [f"{variant} {engine} {1000 / max(case['rates']):.0f} ms (reference {ms})"
                 for (variant, engine), ms in REFERENCE_MS.items()
                 if (case := by_key.get((variant, 3.0, 1, engine))) is not None]
        print("\nfor scale, the best round's ms per 3 s request, one at a time, 2 threads: " + "; ".join(scale))
    print()
    for a in agreement:
        min_precision = MIN_PRECISION_COSINE[a["precision"]]  # int8's verdict is its EER, below
        agrees = (a["server"] >= MIN_SERVER_COSINE and a["precision_cosine"] >= min_precision
                  and a["sherpa"] >= MIN_SHERPA_COSINE and a["nearest"] == a["recordings"])
        print(f"{verdict(agrees)}  agreement, {a['variant']} {a['seconds']:g} s, {a['recordings']} speakers' recordings: "
              f"spkft serve vs in-process worst cosine {a['server']:.6f} (target >= {MIN_SERVER_COSINE}); "
              f"{a['precision']} vs onnxruntime fp32 worst {a['precision_cosine']:.6f} (target >= {min_precision}); "
              f"sherpa-onnx vs onnxruntime worst {a['sherpa']:.6f} (target >= {MIN_SHERPA_COSINE}), nearest to its own "
              f"recording for {a['nearest']}/{a['recordings']}; for scale, different speakers by spkft "
              f"{a['speakers']:.4f} on average")
    for case in (c for c in cases if c["engine"] == SERVER):
        key = (case["variant"], case["seconds"], case["concurrency"])
        bare, sherpa = by_key[(*key, IN_PROCESS)], by_key[(*key, SHERPA)]
        where = f"{case['variant']} {case['seconds']:g} s, concurrency {case['concurrency']}"
        overhead = paired(case, bare)
        print(f"{verdict(overhead >= TARGET_OVERHEAD)}  serving overhead, {where}: spkft serve / in-process "
              f"{overhead:.2f}x (target >= {TARGET_OVERHEAD:g}x; best rounds {max(case['rates']) / max(bare['rates']):.2f}x)")
        if case["concurrency"] == SHERPA_CONCURRENCY:
            versus = paired(case, sherpa)
            print(f"{verdict(versus >= TARGET_VS_SHERPA)}  vs sherpa-onnx, {where}: spkft serve / sherpa-onnx "
                  f"{versus:.2f}x (target >= {TARGET_VS_SHERPA:g}x; best rounds "
                  f"{max(case['rates']) / max(sherpa['rates']):.2f}x; in-process / sherpa-onnx {paired(bare, sherpa):.2f}x)")
        bf16 = by_key.get((*key, BF16))
        if bf16 is None:
            continue
        if case["concurrency"] == SHERPA_CONCURRENCY:
            faster = paired(bare, bf16)
            print(f"{verdict(faster >= TARGET_VS_BF16)}  vs bf16, {where}: in-process {bare_precision(agreement, case)} / "
                  f"bf16 throughput {faster:.2f}x (target >= {TARGET_VS_BF16:g}x; best rounds "
                  f"{max(bare['rates']) / max(bf16['rates']):.2f}x; spkft serve / bf16 {paired(case, bf16):.2f}x)")
        if case["concurrency"] == 1:
            quicker = p50(bare) / p50(bf16)
            print(f"{verdict(quicker <= TARGET_LATENCY_VS_BF16)}  latency vs bf16, {where}: in-process p50 "
                  f"{1000 * p50(bare):.0f} ms / bf16 {1000 * p50(bf16):.0f} ms = {quicker:.2f} (target <= "
                  f"{TARGET_LATENCY_VS_BF16:g}; spkft serve p50 {1000 * p50(case):.0f} ms)")
    report_eers(eers)


def bare_precision(agreement: list[dict], case: dict) -> str:
    return next(a["precision"] for a in agreement if (a["variant"], a["seconds"]) == (case["variant"], case["seconds"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seconds", type=float, nargs="+", default=[3.0, 10.0], help="recording lengths (default 3 10)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32],
                        help="client threads sending at once (default 1 8 32)")
    parser.add_argument("--requests", type=int, default=16,
                        help="requests per engine and round, raised to the concurrency if lower (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up (default 3)")
    parser.add_argument("--threads", type=int, default=2,
                        help="cores for every engine: onnxruntime intra-op threads in-process and in sherpa-onnx, "
                             "split among the server's workers (default 2)")
    parser.add_argument("--workers", type=int, default=1, help="spkft serve --workers (default 1, the server's own)")
    parser.add_argument("--engine", default="auto", choices=ENGINE_CHOICES,
                        help="spkft serve --engine, and the in-process engine it is compared with (default auto)")
    parser.add_argument("--precision", default="int8", choices=PRECISION_CHOICES,
                        help="spkft serve --precision, likewise (default int8)")
    parser.add_argument("--server-threads", type=int,
                        help="spkft serve --threads, onnxruntime threads per inference call (default: --threads / --workers)")
    parser.add_argument("--in-process-calls", type=int, default=8,
                        help="most calls at once into each in-process engine; other client threads wait (default 8)")
    parser.add_argument("--clips", type=int, default=8, help="distinct recordings (speakers) per length (default 8)")
    parser.add_argument("--cache", type=Path, help="keep exported models here and reuse them (default: a temporary directory)")
    args = parser.parse_args()
    if min(args.concurrency + [args.requests, args.rounds, args.threads, args.workers, args.server_threads or 1,
                               args.in_process_calls]) < 1:
        parser.error("concurrency, requests, rounds, threads, workers, server threads and in-process calls must be at least 1")
    if args.clips < 2:
        parser.error("--clips must be at least 2: the agreement check tells speakers apart")
    if not SPEECH.is_dir():
        sys.exit(f"real speech not found at {SPEECH}; this benchmark needs ../shared/data beside the checkout")
    if importlib.util.find_spec("sherpa_onnx") is None:
        sys.exit("sherpa-onnx is not installed: pip install -e '.[bench]'")
    import torch

    from spkft.core.checkpoint import read_checkpoint
    from spkft.core.quantize import quantization_data

    started = time.monotonic()
    # The demo base model's run: its training recordings calibrate, its validation trials measure.
    int8_data = quantization_data(read_checkpoint(DEMO_BASE))
    # fbank runs in every request thread at once, as in spkft serve (see serve.server.run_until_signalled).
    torch.set_num_threads(1)
    clips = {seconds: speech_clips(seconds, args.clips) for seconds in args.seconds}
    cases, agreement = [], []
    with contextlib.ExitStack() as stack:
        if args.cache is not None:
            args.cache.mkdir(parents=True, exist_ok=True)
            models = args.cache
        else:
            models = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="spkft-serve-speed-")))
        eers = precision_eers(models, int8_data)
        for variant in args.variants:
            model = exported_model(variant, models, int8_data)
            with tempfile.TemporaryDirectory(prefix="spkft-serve-speed-") as workdir:
                found = measure_variant(args, variant, model, clips, Path(workdir))
            cases += found[0]
            agreement += found[1]
    report(args, cases, agreement, eers)
    print(f"\n(this run took {(time.monotonic() - started) / 60:.1f} minutes)")


if __name__ == "__main__":
    main()

"""Peak memory of ``spkft serve`` under concurrent worst-case requests, with its default limits.

The server runs as ``spkft serve`` in a subprocess with its defaults (60 s per recording, 32
recordings and 300 s per call, 32 handler threads), serving a random-weight ONNX export of the
variant. Each kind of worst case gets a fresh server: its resident memory once loaded is the
baseline, then the clients send ``--clients`` requests at once, and the peak resident memory of
the server process (``VmHWM`` in ``/proc/<pid>/status``) is read after the batch. The kinds:

- ``pcm 48k stereo``: 60 s of int16 PCM at 48 kHz stereo, the largest message the server takes
  (11.5 MB);
- ``odd rate``: 60 s of int16 PCM at 16001 Hz, the rate that once took 5 GB to resample;
- ``many channels``: a FLAC of 8 channels at 655,350 Hz (2 s of faint noise, 2.6 MB),
  refused from its header;
- ``enroll 5 x 60 s``: an EnrollSpeaker of five 60 s FLAC recordings, the most audio one call may
  carry.

Target: peak resident memory at most the loaded server's plus 2 GiB, at every kind.

    python benchmarks/serve_memory.py [--variant eres2netv2] [--clients 32] [--cache DIR]

It needs ../shared/data beside the checkout (the recordings are real speech, repeated to length).
"""

from __future__ import annotations

import argparse
import io
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
SPEECH = ROOT.parent / "shared" / "data" / "librispeech-train-clean-100-251spk"
TARGET_BYTES = 2 << 30
SEED = 0


def resident(pid: int) -> tuple[int, int]:
    """The process's resident and peak resident memory, in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) << 10, int(fields["VmHWM"].split()[0]) << 10


def speech(seconds: float, rate: int) -> np.ndarray:
    """Real speech repeated to ``seconds`` at ``rate``, as float32 in [-1, 1]."""
    import torch
    import torchaudio.functional as AF

    data, source_rate = sf.read(sorted(SPEECH.glob("*.flac"))[0], dtype="float32")
    whole = np.tile(data, int(np.ceil(seconds * source_rate / len(data))))[: int(seconds * source_rate)]
    return AF.resample(torch.from_numpy(whole), source_rate, rate).numpy() if rate != source_rate else whole


def encoded(samples: np.ndarray, rate: int, fmt: str = "FLAC") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype="PCM_16")
    return buffer.getvalue()


def requests(pb) -> dict[str, tuple[str, object]]:
    """Each worst case as (RPC name, request)."""
    stereo = np.stack([speech(60.0, 48_000)] * 2, axis=1)
    pcm_48k = pb.Audio(pcm=pb.PcmAudio(samples=(stereo * 32767).astype("<i2").tobytes(), sample_rate_hertz=48_000,
                                       channel_count=2, format=pb.SAMPLE_FORMAT_INT16))
    odd = pb.Audio(pcm=pb.PcmAudio(samples=(speech(60.0, 16_001) * 32767).astype("<i2").tobytes(),
                                   sample_rate_hertz=16_001, channel_count=1, format=pb.SAMPLE_FORMAT_INT16))
    noise = np.random.default_rng(SEED).integers(-1, 2, size=(2 * 655_350, 8), dtype=np.int16)
    many = pb.Audio(content=encoded(noise, 655_350))
    minute = pb.Audio(content=encoded(speech(60.0, 16_000), 16_000))
    return {
        "many channels": ("Embed", pb.EmbedRequest(audio=many)),
        "odd rate": ("Embed", pb.EmbedRequest(audio=odd)),
        "pcm 48k stereo": ("Embed", pb.EmbedRequest(audio=pcm_48k)),
        "enroll 5 x 60 s": ("EnrollSpeaker", pb.EnrollSpeakerRequest(speaker_id="worst", audios=[minute] * 5)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="eres2netv2")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--cache", type=Path, help="keep the exported model here for the next run")
    args = parser.parse_args()
    if not SPEECH.is_dir():
        sys.exit(f"{SPEECH} is missing: this benchmark reads real speech from ../shared/data")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import grpc

    from serve_speed import exported_model
    from spkft.serve.v1 import speaker_service_pb2 as pb
    from spkft.serve.v1 import speaker_service_pb2_grpc as pb_grpc

    workdir = Path(tempfile.mkdtemp(prefix="spkft-serve-memory-"))
    cache = args.cache or workdir
    cache.mkdir(parents=True, exist_ok=True)
    model = exported_model(args.variant, cache)
    cases = requests(pb)
    command = [sys.executable, "-m", "spkft.tui.cli", "serve", "--model", str(model), "--port", "0"]
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    rows = []
    for number, (name, (method, request)) in enumerate(cases.items()):
        log_path = workdir / f"server-{number}.log"
        with open(log_path, "w") as log:
            server = subprocess.Popen([*command, "--enroll-db", str(workdir / f"enrollments-{number}.sqlite")],
                                      stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            announced = re.search(r"listening on (\S+)", server.stdout.readline())
            if announced is None:
                sys.exit(f"spkft serve did not start; its log:\n{log_path.read_text()}")
            loaded, _ = resident(server.pid)
            with grpc.insecure_channel(announced.group(1), options=options) as channel:
                call = getattr(pb_grpc.SpeakerServiceStub(channel), method)

                def one(_):
                    try:
                        call(request, timeout=1800)
                        return "OK"
                    except grpc.RpcError as error:
                        return error.code().name

                started = time.monotonic()
                with ThreadPoolExecutor(args.clients) as pool:
                    codes = list(pool.map(one, range(args.clients)))
                seconds = time.monotonic() - started
            _, peak = resident(server.pid)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=120)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        answered = ", ".join(f"{codes.count(c)} {c}" for c in sorted(set(codes)))
        rows.append((name, request.ByteSize(), answered, seconds, loaded, peak))
        print(f"{name}: {answered} in {seconds:.0f} s; loaded {loaded / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB",
              flush=True)

    print(f"\n{args.clients} clients at once, a fresh spkft serve ({args.variant}) for each kind\n")
    print("| worst case | request | answers | wall time | loaded | peak resident | above loaded |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for name, size, answered, seconds, loaded, peak in rows:
        print(f"| {name} | {size / 1e6:.1f} MB | {answered} | {seconds:.0f} s | {loaded / 2**20:.0f} MiB | "
              f"{peak / 2**20:.0f} MiB | {(peak - loaded) / 2**20:+.0f} MiB |")
    worst = max(peak - loaded for *_, loaded, peak in rows)
    verdict = "PASS" if worst <= TARGET_BYTES else "FAIL"
    print(f"\n{verdict}  peak at most the loaded server plus 2 GiB: {worst / 2**20:+.0f} MiB at worst")
    sys.exit(0 if verdict == "PASS" else 1)


if __name__ == "__main__":
    main()

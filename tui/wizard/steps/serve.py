"""Step 8: export to ONNX (checked against PyTorch), offer int8 with its EER beside fp32's, serve it over gRPC,
try it, and how to call it."""

from __future__ import annotations

from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.validation import Integer
from textual.widgets import Button, Input, Label, Select, Static
from textual.worker import Worker, WorkerState

from spkft.core.calibration import bayes_threshold, odds
from spkft.core.checkpoint import read_checkpoint
from spkft.core.export import MIN_COSINE, ExportResult, QuantizedModel, export_int8, export_onnx
from spkft.core.quantize import DEFAULT_MAX_EER_INCREASE, EerRoseError, quantization_data
from spkft.serve.client import SpeakerClient
from spkft.serve.server import ServerConfig, SpeakerServer, create_server
from spkft.tui.cli.export import int8_comparison
from spkft.tui.cli.output import score_against
from spkft.tui.wizard.fields import PathInput
from spkft.tui.wizard.steps.evaluate import DECISION_PRIOR
from spkft.tui.wizard.step import StepScreen

DEFAULT_PORT = 50051
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus")
PRECISIONS = [("auto: int8 once verified, else bf16 or fp32", "auto"), ("int8", "int8"), ("bf16", "bf16"),
              ("fp32", "fp32")]


def shown(path: Path) -> str:
    """A path as the user would type it: relative when it lies below the working folder."""
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def cli_snippet(address: str, test: str, reference: str) -> str:
    return f"spkft client verify {test} {reference} --server {address}"


def python_snippet(address: str, test: str, reference: str) -> str:
    return (f"from spkft.serve.client import SpeakerClient\n\n"
            f"with SpeakerClient({address!r}) as client:\n"
            f"    result = client.verify({test!r}, reference={reference!r})\n"
            f"    print(result.score, result.accepted, result.llr if result.HasField('llr') else None)\n")


def stop_server(server: SpeakerServer) -> None:
    """Stop serving: refuse new calls, give calls in flight a moment, release the model and port."""
    server.drain(grace_seconds=1.0)


class ServeStep(StepScreen):
    NUMBER = 8
    HEADING = "Export and serve"
    NEXT_LABEL = "Finish"

    def compose_body(self) -> ComposeResult:
        run_dir = self.draft.training.run_dir
        yield Label("Export", classes="section")
        yield Static("The best checkpoint as an ONNX model (input fbank, output the 192-dim embedding, with "
                     "sherpa-onnx's metadata), checked against PyTorch before it is written.", classes="field-hint")
        with Horizontal(classes="field-row"):
            yield Label("ONNX file", classes="field-label")
            yield PathInput(str(run_dir / "model.onnx"), suffixes=(".onnx",), id="onnx-path")
        with Horizontal(classes="actions"):
            yield Static(id="threshold", markup=False)
            yield Button("Export to ONNX", id="export", variant="primary", compact=True)
        yield Static(id="export-result", markup=False)
        with Horizontal(classes="actions"):
            yield Static(f"int8: smaller and faster on CPUs with VNNI or AMX; written only if its validation "
                         f"EER stays within {100 * DEFAULT_MAX_EER_INCREASE:g} % of fp32's.", markup=False)
            yield Button("Try int8", id="quantize", compact=True)
        yield Static(id="int8-result", markup=False)
        yield Label("Serve", classes="section")
        with Horizontal(classes="field-row"):
            yield Label("Precision", classes="field-label")
            yield Select(PRECISIONS, value="auto", allow_blank=False, id="precision", compact=True)
        with Horizontal(classes="field-row"):
            yield Label("Port", classes="field-label")
            yield Input(str(DEFAULT_PORT), id="port", validators=[Integer(minimum=0, maximum=65535)], compact=True)
            yield Button("Start server", id="start-server", compact=True)
            yield Button("Stop server", id="stop-server", compact=True)
        yield Static(id="server-state", markup=False)
        yield Label("Try a verification", classes="section")
        reference, test = self.sample_pair()
        with Horizontal(classes="field-row"):
            yield Label("Reference", classes="field-label")
            yield PathInput(reference, suffixes=AUDIO_SUFFIXES, folders=False, id="reference")
        with Horizontal(classes="field-row"):
            yield Label("Test", classes="field-label")
            yield PathInput(test, suffixes=AUDIO_SUFFIXES, folders=False, id="test")
        with Horizontal(classes="actions"):
            yield Static(id="verdict", markup=False)
            yield Button("Verify", id="verify", compact=True)
        yield Label("Call it from your code", classes="section")
        yield Static(id="snippets", markup=False, classes="snippet")
        with Horizontal(classes="actions"):
            yield Button("Copy spkft client command", id="copy-cli", compact=True)
            yield Button("Copy Python", id="copy-python", compact=True)

    def sample_pair(self) -> tuple[str, str]:
        """Two recordings of one speaker from the scanned data, to verify against each other."""
        if self.draft.scan is None:
            return "", ""
        by_speaker: dict[str, list[str]] = {}
        for recording in self.draft.scan.recordings:
            by_speaker.setdefault(recording.speaker, []).append(shown(recording.path))
        pair = next((paths[:2] for paths in by_speaker.values() if len(set(paths)) >= 2), None)
        if pair is None:  # no speaker has two files: two speakers show a rejection instead
            paths = [shown(r.path) for r in self.draft.scan.recordings[:2]]
            pair = (paths + paths)[:2]
        return pair[0], pair[1]

    def on_mount(self) -> None:
        # Calibrated on the validation speakers, never on the test speakers whose figures step 7 reports.
        evaluation = self.draft.evaluation
        if evaluation is not None and evaluation.calibrated:
            self.query_one("#threshold", Static).update(
                f"Decisions: calibrated on the validation speakers. At a prior of {DECISION_PRIOR:g} (spkft serve "
                f"--p-target; a request may give its own) it accepts when the evidence favours the same speaker "
                f"at least {odds(bayes_threshold(DECISION_PRIOR))}, and Verify answers the LLR and the probability.")
        else:
            self.query_one("#threshold", Static).update(
                "Threshold: the validation speakers' EER threshold (test speakers only measure).")
        if self.draft.exported is not None:
            self.show_export(self.draft.exported)
        if self.draft.int8 is not None:
            self.show_int8(self.draft.int8)
        self.show_server()

    @work(thread=True, exclusive=True, exit_on_error=False, group="export")
    def export(self, checkpoint: Path, output: Path) -> ExportResult:
        output.parent.mkdir(parents=True, exist_ok=True)
        return export_onnx(checkpoint, output)  # its threshold: the validation EER threshold the checkpoint holds

    @work(thread=True, exclusive=True, exit_on_error=False, group="export")
    def quantize(self, checkpoint: Path, fp32: Path) -> QuantizedModel | EerRoseError:
        """Calibrated on the run's training data, measured on its validation trials; a refusal is a result too."""
        data = quantization_data(read_checkpoint(checkpoint))
        try:  # its stages (and the search for layers to keep in fp32 takes minutes) show in the status line
            return export_int8(fp32, data, note=lambda line: self.app.call_from_thread(self.say, line))
        except EerRoseError as refused:
            return refused

    @work(thread=True, exclusive=True, exit_on_error=False, group="server")
    def start_server(self, model: Path, port: int, enroll_db: Path, precision: str) -> SpeakerServer:
        server = create_server(ServerConfig(model=model, port=port, enroll_db=enroll_db, precision=precision))
        server.start()
        try:
            server.load()
        except BaseException:
            server.drain(0)
            raise
        return server

    @work(thread=True, exclusive=True, exit_on_error=False, group="server")
    def stop(self, server: SpeakerServer) -> None:
        stop_server(server)

    @work(thread=True, exclusive=True, exit_on_error=False, group="verify")
    def verify(self, address: str, reference: Path, test: Path) -> str:
        with SpeakerClient(address) as client:
            result = client.verify(test, reference=reference)
        relation, verdict = (">=", "same speaker") if result.accepted else ("<", "different speakers")
        if result.HasField("llr_threshold"):  # a calibrated model decides on its LLR
            return (f"score {result.score:.4f}, LLR {result.llr:.2f} {relation} {result.llr_threshold:.2f}, "
                    f"P(same speaker) {result.probability:.3f} at prior {DECISION_PRIOR:g}: {verdict}")
        shown, bar = score_against(result.score, result.threshold)
        return f"score {shown} {relation} threshold {bar}: {verdict}"

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state is not WorkerState.SUCCESS:
            return
        match event.worker.name:
            case "export":
                self.draft.exported = event.worker.result
                self.draft.int8 = None  # a new fp32 file: an int8 model of the old one is no longer its twin
                self.show_export(self.draft.exported)
                self.query_one("#int8-result", Static).update("")
                self.say("Exported and checked.")
            case "quantize":
                self.draft.int8 = event.worker.result
                self.show_int8(self.draft.int8)
                written = isinstance(self.draft.int8, QuantizedModel)
                self.say("int8 written: choose it under Precision to serve it." if written
                         else "int8 was not written: its EER rose too much.", problem=not written)
            case "start_server":
                self.draft.server = event.worker.result
                self.show_server()
                self.say(f"Serving on {self.draft.server.address}.")
            case "stop":
                self.draft.server = None
                self.show_server()
                self.say("The server has stopped.")
            case "verify":
                self.query_one("#verdict", Static).update(event.worker.result)
                self.say("The server answered.")

    def show_export(self, result: ExportResult) -> None:
        parity = result.parity
        self.query_one("#export-result", Static).update(
            f"✓ wrote {result.output} ({result.size_bytes / 1e6:.1f} MB, opset {result.opset}) in "
            f"{result.seconds:.1f} s\nparity, onnxruntime vs PyTorch: worst cosine {parity.worst_cosine:.7f} "
            f"(needs ≥ {MIN_COSINE}), max abs diff {parity.max_abs_diff:.2g}, over batch sizes "
            f"{', '.join(map(str, parity.batch_sizes))} and {', '.join(map(str, parity.frame_counts))} frames")

    def show_int8(self, result: QuantizedModel | EerRoseError) -> None:
        if isinstance(result, EerRoseError):
            lines = int8_comparison(result.fp32, result.int8, result.allowed, "validation")
            lines.append("✗ not written: serve fp32 or bf16, or retrain with more data")
        else:
            lines = int8_comparison(result.fp32, result.int8, result.max_eer_increase, result.evaluation_source)
            lines.append(f"✓ wrote {result.path} ({result.size_bytes / 1e6:.1f} MB), calibrated on {result.calibration}")
            if result.fp32_layers:
                lines.append(f"  {len(result.fp32_layers)} layer(s) kept in fp32 to hold the EER: "
                             f"{', '.join(result.fp32_layers)}")
        self.query_one("#int8-result", Static).update("\n".join(lines))

    def show_server(self) -> None:
        server = self.draft.server
        self.query_one("#start-server", Button).display = server is None
        self.query_one("#stop-server", Button).display = server is not None
        self.query_one("#verify", Button).disabled = server is None
        state = self.query_one("#server-state", Static)
        if server is None:
            state.update("Not serving. Export first, then start the server.")
        else:
            served = server.service.model
            state.update(f"Serving {server.config.model} on {server.address} with {served.engine} in "
                         f"{served.precision} (plaintext, no auth); enrolled "
                         f"speakers in {server.config.enroll_db}. spkft serve --model {server.config.model} "
                         "runs the same server on its own.")
        self.show_snippets()

    @property
    def address(self) -> str:
        return self.draft.server.address if self.draft.server else f"127.0.0.1:{DEFAULT_PORT}"

    def audio_paths(self) -> tuple[str, str]:
        """The test and reference recordings as typed (either may be empty)."""
        return (self.query_one("#test", PathInput).input.value.strip(),
                self.query_one("#reference", PathInput).input.value.strip())

    def snippets(self) -> tuple[str, str]:
        """The spkft client command and the Python code that verify the chosen recordings."""
        test, reference = self.audio_paths()
        test, reference = test or "test.wav", reference or "reference.wav"
        return cli_snippet(self.address, test, reference), python_snippet(self.address, test, reference)

    def show_snippets(self) -> None:
        self.query_one("#snippets", Static).update("\n\n".join(self.snippets()))

    def on_input_changed(self, event: Input.Changed) -> None:
        if self.is_mounted and event.input.parent in (self.query_one("#test"), self.query_one("#reference")):
            self.show_snippets()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        test, reference = self.audio_paths()
        match event.button.id:
            case "export":
                output = self.query_one("#onnx-path", PathInput).path
                if output is None:
                    self.say("Name the ONNX file first.", problem=True)
                    return
                self.say("Exporting and checking against PyTorch…")
                self.export(Path(self.draft.training.finished.best_checkpoint), output)
            case "quantize":
                if self.draft.exported is None:
                    self.say("Export the model first: int8 is made from the ONNX file.", problem=True)
                    return
                self.say("Calibrating int8 on the training recordings and measuring both on the validation trials…")
                self.quantize(Path(self.draft.training.finished.best_checkpoint), self.draft.exported.output)
            case "start-server":
                port = self.query_one("#port", Input)
                precision = self.query_one("#precision", Select).value
                if self.draft.exported is None:
                    self.say("Export the model first.", problem=True)
                elif precision == "int8" and not isinstance(self.draft.int8, QuantizedModel):
                    self.say("There is no int8 model to serve: try int8 first, or choose another precision.",
                             problem=True)
                elif not port.is_valid:
                    self.say("The port must be a number from 0 to 65535.", problem=True)
                else:
                    self.say("Starting the server and loading the model…")
                    self.start_server(self.draft.exported.output, int(port.value),
                                      self.draft.training.run_dir / "enrollments.sqlite", precision)
            case "stop-server" if self.draft.server is not None:
                self.say("Stopping the server…")
                self.stop(self.draft.server)
            case "verify" if self.draft.server is not None:
                if not test or not reference:
                    self.say("Choose a reference and a test recording first.", problem=True)
                    return
                self.say("Asking the server…")
                self.verify(self.draft.server.address, Path(reference), Path(test))
            case "copy-cli":
                self.app.copy_to_clipboard(self.snippets()[0])
                self.say("Copied the spkft client command.")
            case "copy-python":
                self.app.copy_to_clipboard(self.snippets()[1])
                self.say("Copied the Python snippet.")
